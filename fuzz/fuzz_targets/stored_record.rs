//! The file store's document as read back at start-up, which a damaged disk or
//! another program may have written: it decodes to tokens or an error, never a
//! panic, with and without a key (sealed values are attacker-controlled ciphertext).
#![no_main]

use authgate::secret::Secret;
use authgate::store::crypto::Cipher;
use authgate::store::file::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode(data, None);
    let key = Secret::new("0".repeat(64));
    if let Ok(cipher) = Cipher::from_key(&key) {
        let _ = decode(data, Some(&cipher));
    }
});
