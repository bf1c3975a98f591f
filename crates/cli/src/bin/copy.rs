//! `copy SOURCE DEST`: copy a disk image's data, and only its data.

use std::process::ExitCode;

use anyhow::Context;
use sparsekit_cli::cmd::copy::Args;
use sparsekit_cli::exit::{finish, parse_args};
use sparsekit_cli::human::{copy_json, copy_summary};
use sparsekit_cli::progress::Reporter;
use sparsekit_copy::{Destination, Opened, Plan, Purpose, Spec, stop_on_signals};

fn main() -> ExitCode {
    match parse_args::<Args>() {
        Ok(args) => finish("copy", run(args)),
        Err(code) => code,
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    args.check()?;
    let stop = stop_on_signals().context("installing signal handlers")?;
    let request = args.request();
    let open = args
        .nbd
        .apply(args.image.open_options(args.format, Purpose::Copy));
    let open = request.source_options(open);
    let progress = Reporter::new(args.progress.mode(), "copy")?;
    let source = Opened::open(&Spec::parse(&args.source)?, &open)?;
    let dest = Destination::open(&Spec::parse(&args.dest)?, &request.dest_options(&open))?;
    let plan = Plan::new(source, dest, &request)?;
    let (from, to) = (
        plan.source().name().to_owned(),
        plan.dest().name().to_owned(),
    );
    let report = plan.execute(&progress, stop);
    progress.finish(report.is_ok());
    let report = report.with_context(|| format!("{from} -> {to}"))?;
    if args.json {
        println!("{}", copy_json(&from, &to, &report));
    } else if !args.progress.quiet {
        eprintln!("copy: {}", copy_summary(&from, &to, &report));
        if report.verified {
            eprintln!("copy: verified: {to} is identical to {from}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
