//! Image signatures: a key signs a small payload naming the image manifest digest (the
//! "simple signing" payload cosign signs), and the signature travels as a referrer of the
//! image. Keys are PEM files as openssl writes them: a PKCS#8 private key to sign
//! (`openssl genpkey -algorithm ed25519`, or an EC P-256 key), and the public key
//! (`openssl pkey -pubout`) to check. The cryptography is ring's; nothing here computes a
//! signature itself.

use base64::Engine as _;
use ring::signature::{self, KeyPair as _};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};
use serde_json::json;

use crate::oci::digest::Digest;

/// The payload type the signature covers.
pub const PAYLOAD_TYPE: &str = "cosign container image signature";

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32-byte key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// The DER prefix of an EC P-256 SubjectPublicKeyInfo; the 65-byte point follows.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A private key that signs.
pub enum SigningKey {
    Ed25519(signature::Ed25519KeyPair),
    P256(signature::EcdsaKeyPair),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SigningKey::Ed25519(_) => "SigningKey(ed25519)",
            SigningKey::P256(_) => "SigningKey(ecdsa-p256)",
        })
    }
}

/// A public key that checks.
#[derive(Debug, Clone)]
pub struct PublicKey {
    algorithm: &'static dyn signature::VerificationAlgorithm,
    bytes: Vec<u8>,
}

/// The bytes of a key file, an error naming it when it cannot be read.
fn read_key_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {}", path.display(), e))
}

impl SigningKey {
    /// Read a PKCS#8 PEM private key file.
    pub fn from_pem_file(path: &std::path::Path) -> Result<SigningKey, String> {
        SigningKey::from_pem(&read_key_file(path)?, &path.display().to_string())
    }

    /// Read a PKCS#8 PEM private key (`what` names it in errors).
    pub fn from_pem(pem: &[u8], what: &str) -> Result<SigningKey, String> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem)
            .map_err(|e| format!("{}: not a PKCS#8 PEM private key: {}", what, e))?;
        let der = der.secret_pkcs8_der();
        if let Ok(k) = signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            return Ok(SigningKey::Ed25519(k));
        }
        let rng = ring::rand::SystemRandom::new();
        signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng)
            .map(SigningKey::P256)
            .map_err(|e| format!("{}: neither an Ed25519 nor an EC P-256 key ({})", what, e))
    }

    /// Sign `payload`.
    pub fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            SigningKey::Ed25519(k) => Ok(k.sign(payload).as_ref().to_vec()),
            SigningKey::P256(k) => k
                .sign(&ring::rand::SystemRandom::new(), payload)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| "signing failed".to_string()),
        }
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        match self {
            SigningKey::Ed25519(k) => PublicKey {
                algorithm: &signature::ED25519,
                bytes: k.public_key().as_ref().to_vec(),
            },
            SigningKey::P256(k) => PublicKey {
                algorithm: &signature::ECDSA_P256_SHA256_ASN1,
                bytes: k.public_key().as_ref().to_vec(),
            },
        }
    }
}

impl PublicKey {
    /// Read a PEM public key file.
    pub fn from_pem_file(path: &std::path::Path) -> Result<PublicKey, String> {
        PublicKey::from_pem(&read_key_file(path)?, &path.display().to_string())
    }

    /// Read a PEM public key (SubjectPublicKeyInfo) of either kind.
    pub fn from_pem(pem: &[u8], what: &str) -> Result<PublicKey, String> {
        let spki = SubjectPublicKeyInfoDer::from_pem_slice(pem)
            .map_err(|e| format!("{}: not a PEM public key: {}", what, e))?;
        let der: &[u8] = spki.as_ref();
        if let Some(key) = der.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
            if key.len() == 32 {
                return Ok(PublicKey {
                    algorithm: &signature::ED25519,
                    bytes: key.to_vec(),
                });
            }
        }
        if let Some(point) = der.strip_prefix(&P256_SPKI_PREFIX[..]) {
            if point.len() == 65 {
                return Ok(PublicKey {
                    algorithm: &signature::ECDSA_P256_SHA256_ASN1,
                    bytes: point.to_vec(),
                });
            }
        }
        Err(format!(
            "{}: neither an Ed25519 nor an EC P-256 public key",
            what
        ))
    }

    /// Whether `sig` is this key's signature of `payload`.
    pub fn verifies(&self, payload: &[u8], sig: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(self.algorithm, &self.bytes)
            .verify(payload, sig)
            .is_ok()
    }
}

/// The payload a signature of `manifest` covers, in canonical JSON.
pub fn payload(manifest: &Digest) -> Vec<u8> {
    crate::oci::image::canonical_json(&json!({
        "critical": {
            "identity": {"docker-reference": ""},
            "image": {"docker-manifest-digest": manifest.to_string()},
            "type": PAYLOAD_TYPE,
        },
        "optional": null,
    }))
}

/// The manifest digest a payload names, when it is a payload of ours.
pub fn payload_subject(payload: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    if v["critical"]["type"].as_str() != Some(PAYLOAD_TYPE) {
        return None;
    }
    v["critical"]["image"]["docker-manifest-digest"]
        .as_str()
        .map(str::to_string)
}

pub fn encode(sig: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(sig)
}

pub fn decode(sig: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(sig).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_checks_with_its_key_only() {
        let rng = ring::rand::SystemRandom::new();
        let doc = signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let key = SigningKey::Ed25519(signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap());
        let p = payload(&Digest::of(b"manifest"));
        let sig = key.sign(&p).unwrap();
        assert!(key.public().verifies(&p, &sig));
        assert!(!key.public().verifies(&payload(&Digest::of(b"other")), &sig));
        assert_eq!(
            payload_subject(&p),
            Some(Digest::of(b"manifest").to_string())
        );
    }
}
