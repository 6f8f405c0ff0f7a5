//! The sidecar's static config file (services, endpoints, policies) as
//! YAML text: parsing never panics, and what it accepts is valid.
//!
//! Run with `scripts/fuzz.sh 60 static_config`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshwire_sidecar::config::StaticConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = StaticConfig::parse(text) {
        for c in file.clusters() {
            c.validate().expect("a parsed service is valid");
        }
    }
});
