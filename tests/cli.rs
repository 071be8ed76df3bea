//! The binary's own commands, run for real: `check` on the fixtures in `tests/check_configs/`
//! (see its README.md), `completions` and `manpage`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_dialback");

/// Every subcommand a user can type.
const SUBCOMMANDS: &[&str] = &[
    "gateway",
    "agent",
    "fingerprint",
    "check",
    "demo",
    "import",
    "completions",
    "manpage",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_configs")
}

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        // The fixtures name variables that must not be set; logging must not add lines.
        .env_remove("DIALBACK_CHECK_TEST_UNSET")
        .env("RUST_LOG", "off")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("output is UTF-8")
}

#[test]
fn check_explains_every_fixture() {
    let dir = fixtures();
    let mut configs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    configs.sort();
    let valid = configs
        .iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("valid_")
        })
        .count();
    assert!(valid >= 2, "at least two valid fixtures");
    assert!(configs.len() - valid >= 8, "at least eight broken fixtures");
    let mut failures = Vec::new();
    for config in &configs {
        let name = config.file_name().unwrap().to_str().unwrap();
        let expected_path = config.with_extension("expected");
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        let out = run(&dir, &["check", "-c", name]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        let output = format!("{stdout}{stderr}");
        let should_pass = name.starts_with("valid_");
        let mut wrong = Vec::new();
        if out.status.code() != Some(if should_pass { 0 } else { 1 }) {
            wrong.push(format!("exit status {:?}", out.status.code()));
        }
        // A valid file's report goes to stdout, a broken one's to stderr, nothing elsewhere.
        let (report, other) = if should_pass {
            (&stdout, &stderr)
        } else {
            (&stderr, &stdout)
        };
        if !other.is_empty() || report.is_empty() {
            wrong.push("report on the wrong stream".to_owned());
        }
        for line in expected
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
        {
            match line.strip_prefix('!') {
                Some(absent) => {
                    let absent = absent.trim_start();
                    if output.contains(absent) {
                        wrong.push(format!("unexpected: {absent}"));
                    }
                }
                None if !output.contains(line) => wrong.push(format!("missing: {line}")),
                None => {}
            }
        }
        // The report's shape: problems sorted by line, warnings after them, a summary last.
        let lines: Vec<&str> = output.lines().collect();
        let summary = lines.last().copied().unwrap_or_default();
        if !summary.starts_with(&format!("{name}: ")) {
            wrong.push(format!("last line is not the summary: {summary:?}"));
        }
        let body = &lines[..lines.len().saturating_sub(1)];
        let first_warning = body
            .iter()
            .position(|l| l.starts_with("warning: "))
            .unwrap_or(body.len());
        if body[first_warning..]
            .iter()
            .any(|l| !l.starts_with("warning: "))
        {
            wrong.push("a problem after a warning".to_owned());
        }
        let line_numbers: Vec<usize> = body[..first_warning]
            .iter()
            .map(|l| {
                l.strip_prefix(&format!("{name}:"))
                    .and_then(|rest| rest.split(':').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            })
            .collect();
        if !line_numbers.is_sorted() {
            wrong.push(format!("problems not sorted by line: {line_numbers:?}"));
        }
        if !should_pass {
            let n = first_warning;
            let counted = format!("{n} problem{}", if n == 1 { "" } else { "s" });
            if !summary.contains(&counted) {
                wrong.push(format!("summary does not say {counted:?}"));
            }
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{name}:\n  {}\n--- output ---\n{output}",
                wrong.join("\n  ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn check_of_a_missing_file_fails() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["check", "-c", "nope.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("nope.toml: cannot read: "), "{stderr}");
    assert!(stderr.ends_with("nope.toml: 1 problem\n"), "{stderr}");
}

#[test]
fn bash_completions_know_the_commands() {
    let out = run(&fixtures(), &["completions", "bash"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let script = text(&out.stdout);
    assert!(script.contains("dialback"), "{script}");
    assert!(script.contains("complete -F"), "{script}");
    for sub in SUBCOMMANDS {
        assert!(script.contains(sub), "bash completions lack {sub}");
    }
    assert!(
        script.contains("--config"),
        "bash completions lack --config"
    );
}

#[test]
fn every_shell_gets_completions() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run(&fixtures(), &["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(
            script.contains("dialback") && script.contains("manpage"),
            "{shell}"
        );
    }
    let out = run(&fixtures(), &["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn manpage_is_roff_covering_every_command() {
    let out = run(&fixtures(), &["manpage"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = text(&out.stdout);
    assert!(
        page.starts_with(".TH") || page.starts_with(".ie"),
        "{}",
        &page[..page.len().min(200)]
    );
    assert!(page.contains(".TH dialback 1"), "no title for dialback");
    assert!(page.contains(".SH SYNOPSIS"), "no synopsis");
    for sub in SUBCOMMANDS {
        assert!(
            page.contains(&format!(".TH dialback-{sub} 1")),
            "no page for {sub}"
        );
        assert!(
            page.contains(&format!("dialback\\-{sub}")),
            "{sub} not named"
        );
    }
    // The options of the commands are documented, e.g. check's format.
    assert!(
        page.contains("FILE:LINE: KEY: message"),
        "check format missing"
    );
    assert!(page.contains("\\-\\-config"), "--config missing");
}

#[test]
fn help_mentions_completions_and_manpage() {
    let out = run(&fixtures(), &["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for needle in ["completions", "manpage", "dialback manpage | man -l -"] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging")
}

/// The example configs pass `check` once their placeholders are filled in, and until then
/// `check` says what to fill in.
#[test]
fn packaging_examples_check_out() {
    let dir = tempfile::tempdir().unwrap();
    let fingerprint = format!("sha256:{}", "ab".repeat(32));
    for name in ["gateway.toml", "agent.toml"] {
        let text = std::fs::read_to_string(packaging().join(name)).unwrap();
        std::fs::write(dir.path().join(name), &text).unwrap();
        let out = run(dir.path(), &["check", "-c", name]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name} passes without a password file"
        );
        let report = text_of(&out);
        assert!(report.contains("rdp.password"), "{report}");

        std::fs::write(
            dir.path().join("rdp.password"),
            "correct horse battery staple\n",
        )
        .unwrap();
        let filled = text.replace(
            "sha256:PASTE-THE-OUTPUT-OF-dialback-fingerprint-HERE",
            &fingerprint,
        );
        std::fs::write(dir.path().join(name), filled).unwrap();
        let out = run(dir.path(), &["check", "-c", name]);
        let report = text_of(&out);
        assert!(out.status.success(), "{report}");
        let kind = name.trim_end_matches(".toml");
        assert_eq!(report, format!("{name}: ok ({kind}, 1 service)\n"));
        std::fs::remove_file(dir.path().join("rdp.password")).unwrap();
    }
}

fn text_of(out: &Output) -> String {
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

#[test]
fn systemd_units_have_the_essentials() {
    let common = [
        "Type=simple",
        "User=dialback",
        "StateDirectory=dialback",
        "Restart=on-failure",
        "RestartSec=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "KillSignal=SIGTERM",
        "WantedBy=multi-user.target",
    ];
    let units = [
        (
            "dialback-gateway.service",
            vec![
                "ExecStart=/usr/local/bin/dialback gateway -c /etc/dialback/gateway.toml",
                "ExecReload=/bin/kill -HUP $MAINPID",
                "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
                "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                "LimitNOFILE=1048576",
            ],
        ),
        (
            "dialback-agent.service",
            vec![
                "ExecStart=/usr/local/bin/dialback agent -c /etc/dialback/agent.toml",
                "CapabilityBoundingSet=\n",
            ],
        ),
    ];
    for (unit, own) in units {
        let text = std::fs::read_to_string(packaging().join(unit)).unwrap();
        for line in common.iter().chain(own.iter()) {
            assert!(text.contains(line), "{unit} lacks {line:?}");
        }
    }
}

/// `import` turns every documented balance.bin / backbalance.bin form into configs that
/// `check` accepts (the agent's once its placeholders are filled in), and refuses what it
/// cannot read with the file and line.
#[test]
fn import_converts_the_old_files_into_checked_configs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("balance.bin"),
        "/~~srvBACK=mypassword1234#:*;\n\
         /~~srvIP=pw-one#:*192.0.2.7;\n\
         /~~srvNET=pw-two#:*51.254.;\n\
         /~~srvDNS=pw-three#:*localhost;\n\
         SSL /~~srvTLS=pw-four#:1;\n\
         /~~site=127.0.0.1:8081;\n\
         /~~site=web2.internal.example:8082;\n",
    )
    .unwrap();
    std::fs::write(
        d.join("backbalance.bin"),
        "/ -> mydomain\\myuser1:mypass@proxy1.corp.example:8080 -> myuser2:pass2@proxy2.corp.example:3128;\n",
    )
    .unwrap();
    let out = run(d, &["import", "balance.bin", "backbalance.bin"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("5 back-connect services, 1 direct service"),
        "{}",
        text(&out.stdout)
    );

    let gw = std::fs::read_to_string(d.join("gateway.toml")).unwrap();
    let v: toml::Value = toml::from_str(&gw).unwrap();
    let s = &v["services"];
    assert_eq!(s["srvBACK"]["password"].as_str(), Some("mypassword1234"));
    assert!(
        s["srvBACK"].get("allow_from").is_none(),
        "'*' allows anyone"
    );
    assert_eq!(s["srvIP"]["allow_from"][0].as_str(), Some("192.0.2.7"));
    assert_eq!(s["srvNET"]["allow_from"][0].as_str(), Some("51.254."));
    assert_eq!(s["srvDNS"]["allow_from"][0].as_str(), Some("localhost"));
    assert_eq!(s["srvTLS"]["data_tls"].as_bool(), Some(true));
    let ups: Vec<&str> = s["site"]["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u.as_str())
        .collect();
    assert_eq!(ups, ["127.0.0.1:8081", "web2.internal.example:8082"]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.join("gateway.toml"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(
        mode & 0o777,
        0o600,
        "the passwords are not readable by others"
    );
    // Point state_dir somewhere writable for the check.
    std::fs::write(
        d.join("gateway.toml"),
        gw.replace("/var/lib/dialback", "state"),
    )
    .unwrap();
    let check = run(d, &["check", "-c", "gateway.toml"]);
    assert!(
        check.status.success(),
        "{}{}",
        text(&check.stdout),
        text(&check.stderr)
    );

    let agent = std::fs::read_to_string(d.join("agent.toml")).unwrap();
    let v: toml::Value = toml::from_str(&agent).unwrap();
    let proxies = v["proxies"].as_array().unwrap();
    assert_eq!(proxies.len(), 2);
    assert_eq!(
        proxies[0]["url"].as_str(),
        Some("http://proxy1.corp.example:8080")
    );
    assert_eq!(proxies[0]["user"].as_str(), Some("mydomain\\myuser1"));
    assert_eq!(proxies[1]["user"].as_str(), Some("myuser2"));
    assert_eq!(
        v["services"]["srvTLS"]["password"].as_str(),
        Some("pw-four")
    );
    let filled = agent.replace(
        "sha256:REPLACE-WITH-THE-GATEWAY-FINGERPRINT",
        &format!("sha256:{}", "ab".repeat(32)),
    );
    std::fs::write(d.join("agent.toml"), filled).unwrap();
    let check = run(d, &["check", "-c", "agent.toml"]);
    assert!(
        check.status.success(),
        "{}{}",
        text(&check.stdout),
        text(&check.stderr)
    );

    // Never overwrites.
    let again = run(d, &["import", "balance.bin"]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("not overwriting"),
        "{}",
        text(&again.stderr)
    );

    // A line it cannot read: file, line, reason.
    let bad = tempfile::tempdir().unwrap();
    std::fs::write(
        bad.path().join("balance.bin"),
        "/~~ok=pw#:*;\n\n/~~srv1=10.0.0.5;\n",
    )
    .unwrap();
    let out = run(bad.path(), &["import", "balance.bin"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("balance.bin:3: "), "{err}");
    assert!(err.contains("host:port the gateway dials"), "{err}");
    assert!(
        !bad.path().join("gateway.toml").exists(),
        "nothing written on error"
    );
}
