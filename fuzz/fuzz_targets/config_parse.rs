//! Any text given to the config parser yields a config or an error, never a panic
//! or a hang.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = authgate::Config::parse(Path::new("/fuzz/proxy.toml"), text);
    }
});
