//! The three commands' command lines, as clap parses them: here rather
//! than in the binaries, so that man pages and shell completions are made
//! from the same definitions ([`crate::dist`]).

pub mod copy;
pub mod map;
pub mod qcow2_info;

/// What `--version` prints after the command's name: `map (sparsekit)
/// 0.1.0`, so that the tools can be told from others of the same name.
pub const VERSION: &str = concat!("(sparsekit) ", env!("CARGO_PKG_VERSION"));

/// Every command's definition, for man pages and completions.
pub fn all() -> Vec<clap::Command> {
    use clap::CommandFactory;
    vec![
        map::Args::command(),
        copy::Args::command(),
        qcow2_info::Args::command(),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_definitions_are_consistent() {
        for c in super::all() {
            c.debug_assert();
        }
    }
}
