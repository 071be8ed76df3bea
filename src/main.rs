//! `dialback`: the gateway and agent binary.

mod cli;
mod config;
mod run;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};

use cli::{Cli, Command, LogFormat, Runtime};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole cause chain on one line: "outer: inner: root".
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr so that stdout carries only command output (`fingerprint`, `check`).
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init fails only if a subscriber is already set, which leaves logging working.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Gateway(args) => {
            let (settings, warnings) = config::load_gateway(&args.config.path)?;
            log_warnings(&warnings);
            match args.runtime {
                Runtime::Tokio => run::gateway(settings),
            }
        }
        Command::Agent(args) => {
            let (settings, warnings) = config::load_agent(&args.config.path)?;
            log_warnings(&warnings);
            match args.runtime {
                Runtime::Tokio => run::agent(settings),
            }
        }
        Command::Fingerprint(args) => fingerprint(&args.path),
        Command::Check(args) => check(&args.path),
        Command::Demo(args) => run::demo(run::DemoOptions {
            gateway_port: args.gateway_port,
            public_port: args.public_port,
            check: args.check,
        }),
    }
}

fn log_warnings(warnings: &[String]) {
    for warning in warnings {
        tracing::warn!("{warning}");
    }
}

fn fingerprint(path: &Path) -> anyhow::Result<()> {
    use dialback_tokio::tls::{format_fingerprint, load_identity, IdentityOrigin};

    let source = config::load_gateway_identity(path)?;
    let (identity, origin) = load_identity(&source)
        .with_context(|| format!("{}: cannot load the gateway identity", path.display()))?;
    match &origin {
        IdentityOrigin::Generated(dir) => tracing::info!(
            path = %dir.display(),
            "generated a self-signed gateway certificate"
        ),
        IdentityOrigin::StateDir(dir) => {
            tracing::info!(path = %dir.display(), "using the gateway certificate in state_dir")
        }
        IdentityOrigin::Files => tracing::info!(
            cert = %source.cert.as_deref().unwrap_or(Path::new("?")).display(),
            "using the configured gateway certificate"
        ),
    }
    println!("{}", format_fingerprint(&identity.fingerprint()));
    Ok(())
}

fn check(path: &Path) -> anyhow::Result<()> {
    let (config, warnings) = config::load_any(path)?;
    let services = config.service_count();
    println!(
        "{}: ok ({}, {services} service{})",
        path.display(),
        config.kind(),
        if services == 1 { "" } else { "s" }
    );
    for warning in warnings {
        println!("warning: {warning}");
    }
    Ok(())
}
