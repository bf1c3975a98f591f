//! libFuzzer target: see `sparsekit_fuzz_harness::qcow2_stream` for what it covers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sparsekit_fuzz_harness::qcow2_stream(data));
