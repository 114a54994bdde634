//! The credential file format's public part: systemd's encrypted credentials are base64
//! text whose first 16 bytes name the key(s) they are sealed with. Reading that header lets
//! cohort check a TPM binding without decrypting anything.

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use crate::creds::CredsError;

/// What a credential blob says it is sealed with: the 16-byte key-type id at the start of
/// every encrypted credential (`CRED_AES256_GCM_BY_*` in systemd's creds-util.h). Reading
/// it lets us *check* that a credential really is TPM-bound instead of trusting `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyBinding {
    Host,
    HostScoped,
    Tpm2,
    Tpm2WithPublicKey,
    HostTpm2,
    HostTpm2Scoped,
    HostTpm2WithPublicKey,
    HostTpm2WithPublicKeyScoped,
    Null,
}

const KEY_IDS: [([u8; 16], KeyBinding); 9] = [
    (hex16("5a1c6a86df9d4096b1d5a65e0862f19a"), KeyBinding::Host),
    (hex16("55b9ed1d38594d43a8319d2ebb332ac6"), KeyBinding::HostScoped),
    (hex16("0c7cc07b117645919c4b0bea08bc20fe"), KeyBinding::Tpm2),
    (hex16("faf7eb9341e3412ca1a436f95a29362f"), KeyBinding::Tpm2WithPublicKey),
    (hex16("93a894094874449090caf2fc93cab553"), KeyBinding::HostTpm2),
    (hex16("ef4ac13679a9480ea7db68897f9f165d"), KeyBinding::HostTpm2Scoped),
    (
        hex16("af4950a849134eb1a73846304ff30c05"),
        KeyBinding::HostTpm2WithPublicKey,
    ),
    (
        hex16("adbc4ca3efb64201ba881b6f2e4095ea"),
        KeyBinding::HostTpm2WithPublicKeyScoped,
    ),
    (hex16("058469daf6f54324800549da0f8ea2fb"), KeyBinding::Null),
];

/// Parse 32 hex digits (spaces ignored) at compile time.
const fn hex16(s: &str) -> [u8; 16] {
    let b = s.as_bytes();
    let mut out = [0u8; 16];
    let (mut i, mut n) = (0, 0);
    while i < b.len() {
        let c = b[i];
        i += 1;
        let v = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => continue,
        };
        out[n / 2] |= if n % 2 == 0 { v << 4 } else { v };
        n += 1;
    }
    assert!(n == 32);
    out
}

impl KeyBinding {
    /// Classify a credential from its raw (base64-decoded) bytes.
    pub fn from_bytes(raw: &[u8]) -> Option<KeyBinding> {
        let id = raw.get(..16)?;
        KEY_IDS.iter().find(|(k, _)| k == id).map(|(_, b)| *b)
    }

    /// True when decryption needs this machine's TPM.
    pub fn uses_tpm2(self) -> bool {
        !matches!(self, KeyBinding::Host | KeyBinding::HostScoped | KeyBinding::Null)
    }
}

impl fmt::Display for KeyBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            KeyBinding::Host => "host key",
            KeyBinding::HostScoped => "host key (user-scoped)",
            KeyBinding::Tpm2 => "TPM2",
            KeyBinding::Tpm2WithPublicKey => "TPM2 with signed PCR policy",
            KeyBinding::HostTpm2 => "host key + TPM2",
            KeyBinding::HostTpm2Scoped => "host key + TPM2 (user-scoped)",
            KeyBinding::HostTpm2WithPublicKey => "host key + TPM2 with signed PCR policy",
            KeyBinding::HostTpm2WithPublicKeyScoped => "host key + TPM2 with signed PCR policy (user-scoped)",
            KeyBinding::Null => "null key (no protection)",
        };
        f.write_str(s)
    }
}

/// An encrypted credential as systemd produced it: base64 text, the exact content of a
/// `/etc/credstore.encrypted/NAME` file.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptedCredential {
    base64: String,
}

impl EncryptedCredential {
    /// Wrap the content of a credential file (surrounding whitespace is ignored, as systemd does).
    pub fn from_base64(text: &str) -> Result<Self, CredsError> {
        let base64: String = text.split_ascii_whitespace().collect();
        let raw = B64.decode(&base64).map_err(|_| CredsError::BadFormat {
            detail: "not base64".into(),
        })?;
        if KeyBinding::from_bytes(&raw).is_none() {
            return Err(CredsError::BadFormat {
                detail: "no known systemd credential header".into(),
            });
        }
        Ok(Self { base64 })
    }

    /// The base64 text to store in a credential file.
    pub fn as_base64(&self) -> &str {
        &self.base64
    }

    /// What the credential is sealed with, read from its header.
    pub fn binding(&self) -> Option<KeyBinding> {
        KeyBinding::from_bytes(&B64.decode(&self.base64).ok()?)
    }
}

impl fmt::Debug for EncryptedCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedCredential")
            .field("binding", &self.binding())
            .field("len", &self.base64.len())
            .finish()
    }
}
