//! Values bound to statements and read from rows, the same for both dialects.

use crate::{Error, Result};

/// A SQL value. Integers are 64-bit signed (unsigned ones that do not fit are refused when
/// bound); booleans come back from PostgreSQL as `Bool`, from SQLite as `Int`.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    /// A u64 past `i64::MAX`: binding it fails (an out-of-range size, an offset...).
    Unsigned(u64),
    Bool(bool),
    Text(String),
    Blob(Vec<u8>),
}

impl Value {
    /// The integer to bind, or the error of an unsigned value out of range.
    pub(crate) fn int(&self) -> Result<Option<i64>> {
        match self {
            Value::Int(v) => Ok(Some(*v)),
            Value::Bool(b) => Ok(Some(i64::from(*b))),
            Value::Unsigned(v) => Err(Error::new(format!(
                "integer {v} is out of range for the database"
            ))),
            _ => Ok(None),
        }
    }
}

pub trait ToValue {
    fn to_value(&self) -> Value;
}

macro_rules! int_to_value {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Int(i64::from(*self))
            }
        }
    )*};
}
int_to_value!(i64, i32, i16, u32, u16, u8);

impl ToValue for u64 {
    fn to_value(&self) -> Value {
        i64::try_from(*self).map_or(Value::Unsigned(*self), Value::Int)
    }
}

impl ToValue for usize {
    fn to_value(&self) -> Value {
        (*self as u64).to_value()
    }
}

impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Bool(*self)
    }
}

impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}

impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl ToValue for [u8] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}

impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}

impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}

impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToValue::to_value)
    }
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}

/// What a statement accepts as parameters: `()`, `params![...]`, `[x]`, a `Vec<Value>`.
pub trait Params {
    fn into_values(self) -> Vec<Value>;
}

impl Params for () {
    fn into_values(self) -> Vec<Value> {
        Vec::new()
    }
}

impl<T: ToValue, const N: usize> Params for [T; N] {
    fn into_values(self) -> Vec<Value> {
        self.iter().map(ToValue::to_value).collect()
    }
}

impl Params for Vec<Value> {
    fn into_values(self) -> Vec<Value> {
        self
    }
}

/// One result row.
#[derive(Clone, Debug)]
pub struct Row {
    pub(crate) values: Vec<Value>,
}

/// A column position (`row.get(0)` infers `i32`, computed positions are `usize`).
pub trait ColumnIndex {
    fn index(self) -> usize;
}

impl ColumnIndex for usize {
    fn index(self) -> usize {
        self
    }
}

impl ColumnIndex for i32 {
    fn index(self) -> usize {
        self as usize
    }
}

impl Row {
    pub fn get<I: ColumnIndex, T: FromValue>(&self, column: I) -> Result<T> {
        let column = column.index();
        let value = self
            .values
            .get(column)
            .ok_or_else(|| Error::new(format!("no column {column} in the row")))?;
        T::from_value(value).map_err(|e| Error::new(format!("column {column}: {e}")))
    }
}

pub trait FromValue: Sized {
    fn from_value(value: &Value) -> Result<Self>;
}

fn mismatch<T>(value: &Value, wanted: &str) -> Result<T> {
    Err(Error::new(format!("expected {wanted}, found {value:?}")))
}

impl FromValue for i64 {
    fn from_value(value: &Value) -> Result<i64> {
        match value {
            Value::Int(v) => Ok(*v),
            other => mismatch(other, "an integer"),
        }
    }
}

macro_rules! int_from_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(value: &Value) -> Result<$t> {
                let v = i64::from_value(value)?;
                <$t>::try_from(v).map_err(|_| {
                    Error::new(format!("integer {v} out of range for {}", stringify!($t)))
                })
            }
        }
    )*};
}
int_from_value!(u64, u32, i32, u16, usize);

impl FromValue for bool {
    fn from_value(value: &Value) -> Result<bool> {
        match value {
            Value::Bool(b) => Ok(*b),
            Value::Int(v) => Ok(*v != 0),
            other => mismatch(other, "a boolean"),
        }
    }
}

impl FromValue for String {
    fn from_value(value: &Value) -> Result<String> {
        match value {
            Value::Text(s) => Ok(s.clone()),
            other => mismatch(other, "text"),
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(value: &Value) -> Result<Vec<u8>> {
        match value {
            Value::Blob(b) => Ok(b.clone()),
            other => mismatch(other, "a blob"),
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: &Value) -> Result<Option<T>> {
        match value {
            Value::Null => Ok(None),
            other => T::from_value(other).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsigned_values_past_i64_are_refused_when_bound() {
        assert_eq!(5u64.to_value(), Value::Int(5));
        let huge = u64::MAX.to_value();
        assert!(huge.int().is_err());
        assert_eq!(Value::Bool(true).int().unwrap(), Some(1));
    }

    #[test]
    fn rows_convert_and_check_ranges() {
        let row = Row {
            values: vec![
                Value::Int(-1),
                Value::Null,
                Value::Int(1),
                Value::Blob(vec![1]),
            ],
        };
        assert_eq!(row.get::<_, i64>(0).unwrap(), -1);
        assert!(row.get::<_, u64>(0).is_err());
        assert_eq!(row.get::<_, Option<i64>>(1).unwrap(), None);
        assert!(row.get::<_, bool>(2).unwrap());
        assert_eq!(row.get::<_, Vec<u8>>(3).unwrap(), vec![1]);
        assert!(row.get::<_, i64>(4).is_err());
    }
}
