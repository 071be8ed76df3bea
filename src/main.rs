//! `dialback`: the gateway and agent binary.

mod cli;
mod config;
mod import;
mod run;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser as _};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};

use cli::{Cli, Command, LogFormat, Runtime};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match execute(cli.command) {
        Ok(code) => code,
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

fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Gateway(args) => {
            raise_open_file_limit();
            let (settings, warnings) = config::load_gateway(&args.config.path)?;
            log_warnings(&warnings);
            if args.runtime == Runtime::Uring {
                run::install_uring()?;
            }
            run::gateway(settings, args.config.path.clone())?;
        }
        Command::Agent(args) => {
            raise_open_file_limit();
            let (settings, warnings) = config::load_agent(&args.config.path)?;
            log_warnings(&warnings);
            if args.runtime == Runtime::Uring {
                run::install_uring()?;
            }
            run::agent(settings)?;
        }
        Command::Fingerprint(args) => fingerprint(&args.path)?,
        Command::Check(args) => return Ok(check(&args.path)),
        Command::Import(args) => import_files(&args)?,
        Command::Demo(args) => run::demo(run::DemoOptions {
            gateway_port: args.gateway_port,
            public_port: args.public_port,
            check: args.check,
        })?,
        Command::Completions(args) => completions(args.shell)?,
        Command::Manpage => manpage()?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Each tunneled connection costs two sockets (and two pipes while bytes move): raise the soft
/// limit on open files to the hard limit, so that a default soft limit (often 1024) does not
/// cap a gateway or an agent at a few hundred connections.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur >= lim.rlim_max
    {
        return;
    }
    let from = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        tracing::debug!(
            from,
            to = lim.rlim_max,
            "raised the soft limit on open files"
        );
    } else {
        let e = std::io::Error::last_os_error();
        tracing::debug!(from, "cannot raise the soft limit on open files: {e}");
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

/// Prints every problem of the file; see the `check` help for the format.
fn check(path: &Path) -> ExitCode {
    let report = config::check_file(path);
    let text = report.render();
    if report.is_ok() {
        print!("{text}");
        ExitCode::SUCCESS
    } else {
        eprint!("{text}");
        ExitCode::FAILURE
    }
}

fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "dialback", &mut out);
    write_stdout(&out)
}

/// The page of `dialback`, then one page per command (`dialback-check(1)`, ...), in one roff
/// document that `man -l -` shows as consecutive pages.
fn manpage() -> anyhow::Result<()> {
    let out = render_manpage().context("cannot render the man page")?;
    write_stdout(&out)
}

fn render_manpage() -> std::io::Result<Vec<u8>> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let source = format!("dialback {}", env!("CARGO_PKG_VERSION"));
    let page = |cmd: &clap::Command| {
        clap_mangen::Man::new(cmd.clone())
            .source(source.clone())
            .manual("dialback manual")
    };
    let mut out = Vec::new();
    page(&cmd).render(&mut out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // After build(), a subcommand's display name is `dialback-NAME` and its bin name
        // `dialback NAME`, which is what its page is titled and its synopsis shows.
        page(sub).render(&mut out)?;
    }
    Ok(out)
}

/// Writes all of `bytes`; a closed pipe (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

/// `dialback import`: reads the old files, writes the two TOML files, never overwriting.
fn import_files(args: &cli::ImportArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;

    let read = |p: &Path| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
    };
    let balance_name = args.balance.display().to_string();
    let entries = import::parse_balance(&balance_name, &read(&args.balance)?)?;
    if entries.is_empty() {
        anyhow::bail!(
            "{balance_name}: no entry (like /~~name=password#:*; or /~~name=host:port;) found"
        );
    }
    let (proxies, sources) = match &args.backbalance {
        Some(p) => {
            let name = p.display().to_string();
            let hops = import::parse_backbalance(&name, &read(p)?)?;
            (hops, format!("{balance_name} and {name}"))
        }
        None => (Vec::new(), balance_name.clone()),
    };
    let mut files = vec![(
        "gateway.toml",
        import::gateway_toml(&balance_name, &entries),
    )];
    // Direct services need no agent; an agent config only for back-connect ones.
    if !entries.back.is_empty() {
        files.push((
            "agent.toml",
            import::agent_toml(&sources, &entries.back, &proxies),
        ));
    }
    for (name, _) in &files {
        let path = args.out.join(name);
        if path.exists() {
            anyhow::bail!("{} exists; not overwriting it", path.display());
        }
    }
    for (name, text) in &files {
        let path = args.out.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        f.write_all(text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    let (back, direct) = (entries.back.len(), entries.direct.len());
    println!(
        "wrote {} ({back} back-connect service{}, {direct} direct service{})",
        args.out.join("gateway.toml").display(),
        plural(back),
        plural(direct),
    );
    if back > 0 {
        println!(
            "wrote {} ({} prox{}); fill in the agent's gateway address, fingerprint and each \
             service's local address",
            args.out.join("agent.toml").display(),
            proxies.len(),
            if proxies.len() == 1 { "y" } else { "ies" },
        );
    }
    Ok(())
}
