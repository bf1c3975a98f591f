//! How the binaries end: exit codes and error messages.

use std::io;
use std::process::ExitCode;

/// True when `err` comes from writing to a closed pipe (`map x | head`),
/// which ends a tool successfully, as in ripgrep.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Parses the command line; on a usage error prints clap's message after
/// the tool's name (`map: error: unexpected argument`, as `finish` prints
/// every other error) and gives exit code 1 (not clap's 2, which
/// `qcow2-info --check` uses for "corruption found"); `--help` and
/// `--version` give 0.
pub fn parse_args<T: clap::Parser>() -> Result<T, ExitCode> {
    T::try_parse().map_err(|e| {
        if e.use_stderr() {
            eprint!("{}: ", T::command().get_name());
        }
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// Turns the result of a binary's `run` into its exit code, printing the
/// error chain (`tool: error: context: cause`) on failure. A broken pipe
/// ends `map` and `qcow2-info` successfully (`map x | head`); for `copy` it
/// means the data was not delivered, which is a failure.
pub fn finish(tool: &str, result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) if tool != "copy" && is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{tool}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn broken_pipe_is_found_behind_context() {
        let e = Err::<(), _>(io::Error::from(io::ErrorKind::BrokenPipe))
            .context("writing")
            .unwrap_err();
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }
}
