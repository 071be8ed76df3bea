//! Command line: `dialback <COMMAND>`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "dialback",
    version,
    about = "Back-connect reverse proxy: publish private services through a public gateway",
    propagate_version = true,
    after_long_help = "Config files are described in README.md; `dialback check -c FILE` lists \
every problem in one. Shell completions: `dialback completions bash|zsh|fish|elvish|powershell`. \
The man page: `dialback manpage | man -l -`."
)]
pub struct Cli {
    /// Log line format (logs go to stderr; the level comes from RUST_LOG, default info)
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines
    Text,
    /// One JSON object per line
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Runtime {
    /// tokio, multi-threaded, epoll (the default)
    Tokio,
    /// relays on thread-per-core io_uring loops (poll + splice); control plane on tokio
    Uring,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the public side: accept agents and public clients
    Gateway(ServeArgs),
    /// Run the private side: register services with a gateway and serve its data requests
    Agent(ServeArgs),
    /// Print the gateway's certificate fingerprint, to pin in agent.toml
    ///
    /// Reads a gateway config and prints only `sha256:...` on stdout, for
    /// `fingerprint = "sha256:..."` in agent.toml. Without cert/key in the config, the
    /// self-signed identity is generated in state_dir on first use and reused afterwards.
    Fingerprint(ConfigArg),
    /// Check a gateway or agent config file: list every problem and warning
    ///
    /// Checks the whole file without starting anything and lists every problem it finds, not
    /// just the first: one line per problem, `FILE:LINE: KEY: message`, sorted by line, then
    /// one line per warning, `warning: FILE:LINE: KEY: message`, then a summary line:
    /// `FILE: ok (gateway, 2 services)` or `FILE: 3 problems (agent config)`.
    ///
    /// A file with a top-level `gateway` key (or other keys only agents have) is checked as an
    /// agent config, anything else as a gateway config. Password files and environment
    /// variables are read, so run it where the service will run. The report goes to stdout
    /// and the exit status is 0 when there is no problem; otherwise it goes to stderr and the
    /// exit status is 1.
    Check(ConfigArg),
    /// Run a gateway, an agent and a sample web service in one process on loopback
    Demo(DemoArgs),
    /// Convert balance.bin / backbalance.bin lines into gateway.toml and agent.toml
    ///
    /// Reads the back-connect entries of balance.bin (`/~~name=password#:*;`, `#:*1.2.3.4;`,
    /// `#:*51.254.;`, `#:*host.dyndns.org;`, with `SSL` in front for data connections under
    /// TLS) and, if given, the proxy cascade of backbalance.bin
    /// (`/ -> \user:pass@proxy:port -> user2:pass@proxy2:port;`), and writes gateway.toml and
    /// agent.toml into --out (never overwriting). A line it cannot read stops the import with
    /// FILE:LINE and the reason. The files hold the passwords: they are created with mode 0600.
    Import(ImportArgs),
    /// Print a shell completion script for bash, zsh, fish, elvish or powershell
    ///
    /// Writes the script to stdout, e.g.:
    ///
    ///   dialback completions bash > /etc/bash_completion.d/dialback
    ///
    ///   dialback completions zsh > /usr/local/share/zsh/site-functions/_dialback
    ///
    ///   dialback completions fish > ~/.config/fish/completions/dialback.fish
    Completions(CompletionsArgs),
    /// Print the man page (roff) for dialback and all its commands
    ///
    /// Writes one roff document to stdout: the page for `dialback`, then one page per command.
    /// Read it with `dialback manpage | man -l -`, or install it with
    /// `dialback manpage > /usr/local/share/man/man1/dialback.1`.
    Manpage,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to generate the script for
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArg,

    /// I/O runtime: tokio (epoll), or uring (relays driven by io_uring)
    #[arg(long, value_enum, default_value_t = Runtime::Tokio)]
    pub runtime: Runtime,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Config file (TOML)
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub path: PathBuf,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The gateway's balance.bin
    pub balance: PathBuf,
    /// The agent's backbalance.bin (its proxy cascade)
    pub backbalance: Option<PathBuf>,
    /// Directory to write gateway.toml and agent.toml into
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Port for the demo gateway's agent listener (loopback)
    #[arg(long, default_value_t = 7000)]
    pub gateway_port: u16,

    /// Public port through which the demo web service is reached (loopback)
    #[arg(long, default_value_t = 8080)]
    pub public_port: u16,

    /// Fetch the demo page once through the tunnel, print it and exit
    #[arg(long)]
    pub check: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use clap::CommandFactory;
    use std::path::Path;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("dialback").chain(args.iter().copied()))
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn gateway_with_config_and_default_runtime() {
        let cli = parse(&["gateway", "-c", "gw.toml"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Text);
        let Command::Gateway(args) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(args.config.path, PathBuf::from("gw.toml"));
        assert_eq!(args.runtime, Runtime::Tokio);
    }

    #[test]
    fn agent_with_long_config_and_runtime() {
        let cli = parse(&["agent", "--config", "a.toml", "--runtime", "tokio"]).unwrap();
        let Command::Agent(args) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(args.config.path, PathBuf::from("a.toml"));
        assert_eq!(args.runtime, Runtime::Tokio);
    }

    #[test]
    fn unknown_runtime_is_rejected() {
        let err = parse(&["gateway", "-c", "gw.toml", "--runtime", "epoll"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidValue);
    }

    #[test]
    fn runtime_help_mentions_io_uring() {
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("gateway")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(
            help.contains("uring") && help.contains("io_uring"),
            "{help}"
        );
        let args = match parse(&["agent", "-c", "a.toml", "--runtime", "uring"])
            .unwrap()
            .command
        {
            Command::Agent(a) => a,
            other => panic!("{other:?}"),
        };
        assert_eq!(args.runtime, Runtime::Uring);
    }

    #[test]
    fn config_is_required() {
        for sub in ["gateway", "agent", "fingerprint", "check"] {
            let err = parse(&[sub]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument, "{sub}");
        }
    }

    #[test]
    fn fingerprint_and_check_take_a_config() {
        let cli = parse(&["fingerprint", "-c", "gw.toml"]).unwrap();
        assert!(
            matches!(cli.command, Command::Fingerprint(ref c) if c.path == Path::new("gw.toml"))
        );
        let cli = parse(&["check", "--config", "x.toml"]).unwrap();
        assert!(matches!(cli.command, Command::Check(ref c) if c.path == Path::new("x.toml")));
        assert!(parse(&["check", "-c", "x.toml", "--runtime", "tokio"]).is_err());
    }

    #[test]
    fn log_format_is_global() {
        let before = parse(&["--log-format", "json", "check", "-c", "x.toml"]).unwrap();
        assert_eq!(before.log_format, LogFormat::Json);
        let after = parse(&["agent", "-c", "a.toml", "--log-format", "json"]).unwrap();
        assert_eq!(after.log_format, LogFormat::Json);
        let err = parse(&["--log-format", "xml", "check", "-c", "x.toml"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidValue);
    }

    #[test]
    fn demo_defaults_and_overrides() {
        let cli = parse(&["demo"]).unwrap();
        let Command::Demo(args) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(
            (args.gateway_port, args.public_port, args.check),
            (7000, 8080, false)
        );
        let cli = parse(&[
            "demo",
            "--gateway-port",
            "17000",
            "--public-port",
            "18080",
            "--check",
        ])
        .unwrap();
        let Command::Demo(args) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(
            (args.gateway_port, args.public_port, args.check),
            (17000, 18080, true)
        );
        assert!(parse(&["demo", "--public-port", "70000"]).is_err());
    }

    #[test]
    fn completions_take_a_shell_and_manpage_nothing() {
        let cli = parse(&["completions", "zsh"]).unwrap();
        assert!(
            matches!(cli.command, Command::Completions(ref a) if a.shell == clap_complete::Shell::Zsh)
        );
        assert_eq!(
            parse(&["completions"]).unwrap_err().kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            parse(&["completions", "tcsh"]).unwrap_err().kind(),
            ErrorKind::InvalidValue
        );
        assert!(matches!(
            parse(&["manpage"]).unwrap().command,
            Command::Manpage
        ));
        assert!(parse(&["manpage", "-c", "x.toml"]).is_err());
    }

    #[test]
    fn help_documents_check_format_completions_and_manpage() {
        let mut cmd = Cli::command();
        let check = cmd
            .find_subcommand_mut("check")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(check.contains("FILE:LINE: KEY: message"), "{check}");
        let top = cmd.render_long_help().to_string();
        assert!(top.contains("dialback completions"), "{top}");
        assert!(top.contains("dialback manpage"), "{top}");
    }

    #[test]
    fn a_command_is_required() {
        let err = parse(&[]).unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
        assert!(parse(&["serve"]).is_err());
    }
}
