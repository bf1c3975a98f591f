//! libFuzzer target: see `sparsekit_fuzz_harness::bmap` for what it covers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sparsekit_fuzz_harness::bmap(data));
