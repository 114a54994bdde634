//! A secret value that does not leak through `Debug` and is wiped when dropped.

use std::fmt;

/// Plaintext from a decrypted credential. `Debug` prints `***`; the bytes are zeroed on
/// drop so they do not linger in freed memory longer than needed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The secret as UTF-8 text, if it is (API keys are).
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // Volatile so the compiler cannot drop the "dead" stores.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}
