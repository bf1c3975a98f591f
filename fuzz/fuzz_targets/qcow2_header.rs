//! libFuzzer target: see `sparsekit_fuzz_harness::qcow2_header` for what it covers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sparsekit_fuzz_harness::qcow2_header(data));
