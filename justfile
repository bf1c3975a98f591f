# The same tasks as `cargo xtask`, for those who use just.

# Install missing tools, generate fixtures, run every test.
test *ARGS:
    cargo xtask test {{ARGS}}

# Release build, then the tools at work on generated images.
demo:
    cargo xtask demo

# Side-by-side timings against the peers, written to BENCHMARKS.md.
bench *ARGS:
    cargo xtask bench {{ARGS}}

# Generate fixtures/generated from fixtures/manifest.toml.
fixtures *ARGS:
    cargo xtask fixtures {{ARGS}}

# What CI runs.
ci:
    bash .ci/run

# Release binaries, man pages and shell completions in target/dist.
dist:
    cargo xtask dist
