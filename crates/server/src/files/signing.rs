//! Signed URLs: an HMAC-SHA256 over the method, the volume id, the path and the expiry, with a
//! secret of the server's (kept in the control database, so every server of one database
//! accepts the URLs of the others). The secret is never printed.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Longest validity a URL can be minted with (like S3's presigned URLs).
pub const MAX_EXPIRY_SECS: u64 = 7 * 24 * 3600;

pub struct UrlSigner {
    secret: Vec<u8>,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UrlSigner { .. }")
    }
}

/// Why a signed request is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signed URL expired at {0}")]
    Expired(String),
    #[error("the signature does not match this method, volume and path")]
    Mismatch,
    #[error("a signed URL needs both `expires` and `signature`")]
    Incomplete,
}

impl UrlSigner {
    pub fn new(secret: Vec<u8>) -> UrlSigner {
        UrlSigner { secret }
    }

    fn mac(&self, method: &str, volume_id: &str, path: &str, expires: u64) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes keys of any length");
        // Fields joined by newlines, which none of them can hold (paths exclude only NUL, so
        // the path goes last).
        mac.update(format!("cellar-url-v1\n{method}\n{volume_id}\n{expires}\n{path}").as_bytes());
        mac
    }

    /// The signature (hex) of `method` on `path` of the volume until `expires` (Unix seconds).
    pub fn sign(&self, method: &str, volume_id: &str, path: &str, expires: u64) -> String {
        hex::encode(
            self.mac(method, volume_id, path, expires)
                .finalize()
                .into_bytes(),
        )
    }

    /// Checks a signature in constant time, then the expiry against `now` (Unix seconds).
    pub fn verify(
        &self,
        method: &str,
        volume_id: &str,
        path: &str,
        expires: u64,
        signature: &str,
        now: u64,
    ) -> Result<(), SignatureError> {
        let signature = hex::decode(signature).map_err(|_| SignatureError::Mismatch)?;
        self.mac(method, volume_id, path, expires)
            .verify_slice(&signature)
            .map_err(|_| SignatureError::Mismatch)?;
        if now >= expires {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires);
            return Err(SignatureError::Expired(
                humantime::format_rfc3339_seconds(at).to_string(),
            ));
        }
        Ok(())
    }
}

/// A fresh secret: 256 bits from the operating system's generator (as hex).
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_mut(16) {
        chunk.copy_from_slice(&uuid::Uuid::new_v4().into_bytes());
    }
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_method_volume_path_and_time_only() {
        let signer = UrlSigner::new(b"secret".to_vec());
        let sig = signer.sign("GET", "vol", "/a/b", 1000);
        assert_eq!(signer.verify("GET", "vol", "/a/b", 1000, &sig, 999), Ok(()));
        assert!(matches!(
            signer.verify("GET", "vol", "/a/b", 1000, &sig, 1000),
            Err(SignatureError::Expired(_))
        ));
        for (method, volume, path, expires) in [
            ("PUT", "vol", "/a/b", 1000),
            ("GET", "vol2", "/a/b", 1000),
            ("GET", "vol", "/a/c", 1000),
            ("GET", "vol", "/a/b", 1001),
        ] {
            assert_eq!(
                signer.verify(method, volume, path, expires, &sig, 0),
                Err(SignatureError::Mismatch),
                "{method} {volume} {path} {expires}"
            );
        }
        assert_eq!(
            signer.verify("GET", "vol", "/a/b", 1000, "zz", 0),
            Err(SignatureError::Mismatch)
        );
        let other = UrlSigner::new(b"other".to_vec());
        assert_eq!(
            other.verify("GET", "vol", "/a/b", 1000, &sig, 0),
            Err(SignatureError::Mismatch)
        );
        assert_ne!(new_secret(), new_secret());
        assert_eq!(new_secret().len(), 64);
    }
}
