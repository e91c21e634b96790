//! Byte sizes on the command line (`10GiB`, `500M`, `none`) and in output (`1.5 GiB`).

/// A quota argument: a size, or `none` for no quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Bytes(u64),
    None,
}

impl Limit {
    pub fn bytes(self) -> Option<u64> {
        match self {
            Limit::Bytes(n) => Some(n),
            Limit::None => None,
        }
    }
}

const HELP: &str = "expected a size like 500M, 10GiB, 2TB or 1048576 (K, M, G, T and KiB... are \
                    powers of 1024, KB, MB... powers of 1000), or none";

/// `none`, or a number with an optional unit.
pub fn parse_limit(text: &str) -> Result<Limit, String> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(Limit::None);
    }
    parse_size(text).map(Limit::Bytes)
}

pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: f64 = number.parse().map_err(|_| format!("{text:?}: {HELP}"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(format!("{text:?}: {HELP}")),
    };
    let bytes = number * scale as f64;
    if !(0.0..1.8e19).contains(&bytes) || (scale == 1 && number.fract() != 0.0) {
        return Err(format!("{text:?}: {HELP}"));
    }
    Ok(bytes.round() as u64)
}

/// `1.5 GiB`, `512 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1.5 G"), Ok(3 << 29));
        assert_eq!(parse_size("2TB"), Ok(2_000_000_000_000));
        assert_eq!(parse_limit("none"), Ok(Limit::None));
        assert!(parse_size("ten").unwrap_err().contains("500M"));
        assert!(parse_size("5X").is_err());
        assert!(parse_size("1.5").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn sizes_print() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10 << 30), "10.0 GiB");
    }
}
