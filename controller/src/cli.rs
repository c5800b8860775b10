//! Command-line flags. Raw flags become a validated [`crate::plan::CheckPlan`] in one place.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Put a sandbox on your tailnet and prove, with structured evidence, that it can reach your dev
/// host.
#[derive(Debug, Parser)]
#[command(name = "tailbox", version, about, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,

    /// When to colour the output: `auto` (on a terminal, unless `NO_COLOR` is set; always if
    /// `CLICOLOR_FORCE` is), `always` or `never`.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = ColorChoice::Auto,
        value_name = "WHEN",
        hide_possible_values = true
    )]
    pub color: ColorChoice,
}

/// When to colour the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    /// On a terminal, honouring `NO_COLOR` and `CLICOLOR_FORCE`.
    Auto,
    /// Always, even into a pipe or file.
    Always,
    /// Never.
    Never,
}

/// Exit codes, shown at the end of `--help`.
pub const EXIT_CODES_HELP: &str = "Exit codes:
  0    every check passed (warnings and skips allowed)
  1    at least one check failed
  2    usage or configuration error
  3    sandbox or infrastructure error (the sandbox, the agent or the link to it failed)
  130  interrupted; cleanup still ran
  141  stdout was closed by its reader (e.g. `| head -1`); the run stopped, cleanup still ran
With several sandboxes (`--count`, repeated `--sandbox-id`): 0 only if every sandbox passed;
  130 if interrupted, else 1 if any sandbox's checks failed, else 3 if any had an error";

/// Examples ending `tailbox check --help`.
const CHECK_EXAMPLES: &str = "Examples:
  # Ping the dev host, fetch its health endpoint and list a git remote, in a Modal sandbox
  export TS_AUTHKEY=tskey-auth-…
  tailbox check --ping 100.64.0.1 --http http://100.64.0.1:7420/health \\
    --git http://100.64.0.1:7420/git/me/app.git --expect-ref main=$(git rev-parse main)

  # The agent on this machine instead, by the dev host's name, keeping the report
  tailbox check --sandbox local --auth-key-file ~/.config/tailbox/key --ping devhost \\
    --report report.json

  # For scripts: JSON lines on stdout, the report last
  tailbox check --json --http 302=http://devhost:7420/login | tail -1 | jq .report.verdict

  # Fan-out: 20 Modal sandboxes, 8 at a time, and the aggregate's percentiles
  tailbox check --count 20 --ping devhost --json | tail -1 | jq .fleet_report.time_to_running";

/// Examples ending `tailbox sandbox --help`.
const SANDBOX_EXAMPLES: &str = "Examples:
  tailbox sandbox sweep --dry-run          # what tailbox left running
  tailbox sandbox sweep                    # terminate all of it
  tailbox sandbox terminate sb-1a2b3c4d    # one kept sandbox";

/// Examples ending `tailbox sandbox sweep --help`.
const SWEEP_EXAMPLES: &str = "Examples:
  tailbox sandbox sweep --dry-run
  tailbox sandbox sweep
  MODAL_APP_NAME=ci-tailbox tailbox sandbox sweep 2>/dev/null | wc -l";

/// Examples ending `tailbox sandbox terminate --help`.
const TERMINATE_EXAMPLES: &str = "Examples:
  tailbox sandbox terminate sb-1a2b3c4d
  tailbox sandbox terminate sb-1a2b3c4d sb-5e6f7a8b";

/// Examples ending `tailbox completions --help`.
const COMPLETIONS_EXAMPLES: &str = "Examples:
  tailbox completions bash > ~/.local/share/bash-completion/completions/tailbox
  tailbox completions zsh > ~/.zfunc/_tailbox    # with fpath+=(~/.zfunc) in ~/.zshrc
  tailbox completions fish > ~/.config/fish/completions/tailbox.fish";

/// Exit codes of `up`, `status` and `down`, shown at the end of their `--help`.
macro_rules! sidecar_exit_codes {
    () => {
        "Exit codes:
  0    done (up: the node is Running; status: it is Running; down: it is down)
  1    the node is not Running (up, status), or its logout failed (down)
  2    usage or configuration error
  3    sandbox or infrastructure error, or no sidecar runs there (status)
  130  interrupted"
    };
}

/// The end of `tailbox up --help`: exit codes, then examples.
const UP_HELP: &str = concat!(
    sidecar_exit_codes!(),
    "

Examples:
  # A Modal sandbox on the tailnet for the next hour; prints its id and the proxy variables
  TS_AUTHKEY=tskey-auth-… tailbox up --hostname agent-1

  # Into a sandbox that already runs, for scripts
  tailbox up --sandbox-id sb-1a2b3c4d --auth-key-file ~/.config/tailbox/key --json"
);

/// The end of `tailbox status --help`.
const STATUS_HELP: &str = concat!(
    sidecar_exit_codes!(),
    "

Examples:
  tailbox status --sandbox-id sb-1a2b3c4d
  tailbox status --sandbox-id sb-1a2b3c4d --json | jq -r .status.backend_state"
);

/// The end of `tailbox down --help`.
const DOWN_HELP: &str = concat!(
    sidecar_exit_codes!(),
    "

Examples:
  tailbox down --sandbox-id sb-1a2b3c4d           # the node, the sidecar and the sandbox
  tailbox down --sandbox-id sb-1a2b3c4d --keep    # keep the sandbox running"
);

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a sandbox, join it to the tailnet and check it can reach the dev host.
    ///
    /// When a sidecar runs in the sandbox (`tailbox up`), the checks use its node and no second
    /// tailscaled starts.
    #[command(after_help = CHECK_EXAMPLES)]
    Check(CheckArgs),
    /// Put a sandbox on the tailnet and keep it there (the sidecar).
    ///
    /// Starts the agent's sidecar in the sandbox, brings the node up, and prints what other
    /// programs need (the proxy variables). The sandbox and the sidecar stay running.
    #[command(after_help = UP_HELP)]
    Up(UpArgs),
    /// Show the sidecar's node: state, tailnet IPs, proxy and health.
    #[command(after_help = STATUS_HELP)]
    Status(StatusArgs),
    /// Take the sidecar down, and the sandbox if tailbox created it.
    ///
    /// Logs the node out, stops tailscaled and the sidecar, then terminates the sandbox if
    /// tailbox created it (unless --keep).
    #[command(after_help = DOWN_HELP)]
    Down(DownArgs),
    /// Manage sandboxes tailbox created.
    #[command(subcommand, after_help = SANDBOX_EXAMPLES)]
    Sandbox(SandboxCommand),
    /// Print a shell completion script on stdout.
    #[command(after_help = COMPLETIONS_EXAMPLES)]
    Completions(CompletionsArgs),
}

/// Arguments of `tailbox completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `tailbox sandbox …`
#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Terminate every sandbox tailbox left running in the app (found by its `created-by=tailbox`
    /// tag), e.g. after --keep or a crash. Prints the ids on stdout.
    #[command(after_help = SWEEP_EXAMPLES)]
    Sweep(SweepArgs),
    /// Terminate Modal sandboxes by id.
    #[command(after_help = TERMINATE_EXAMPLES)]
    Terminate(TerminateArgs),
}

/// Flags of `tailbox sandbox sweep`.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Only list what would be terminated.
    #[arg(long)]
    pub dry_run: bool,
}

/// Arguments of `tailbox sandbox terminate`.
#[derive(Debug, Args)]
pub struct TerminateArgs {
    /// Sandbox ids (sb-…).
    #[arg(required = true, value_name = "ID")]
    pub ids: Vec<String>,
}

/// Where the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SandboxKind {
    /// Modal if credentials are configured, local otherwise.
    Auto,
    /// The agent runs as a child process on this machine.
    Local,
    /// The agent runs in a Modal sandbox.
    Modal,
}

/// Which sandbox, and the agent to put in it: shared by `check`, `up`, `status` and `down`.
#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    /// Where the agent runs.
    #[arg(long, value_enum, default_value_t = SandboxKind::Auto)]
    pub sandbox: SandboxKind,

    /// An existing Modal sandbox to use instead of creating one (`check`: repeat it to check
    /// several at once).
    #[arg(long, value_name = "ID")]
    pub sandbox_id: Vec<String>,

    /// tailbox-agent to run or upload: a binary, or a directory holding one per architecture
    /// (e.g. cargo's `target`); repeat for several. The sandbox's architecture picks one
    /// [env: TAILBOX_AGENT, `:`-separated; default: the builds next to `tailbox`].
    #[arg(long, value_name = "PATH")]
    pub agent: Vec<PathBuf>,

    /// The sidecar's state directory in the sandbox (its socket, lock and log)
    /// [env: TAILBOX_SIDECAR_DIR; default: /tmp/tailbox/sidecar].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<String>,
}

/// How the sandbox joins the tailnet: shared by `check` and `up`.
#[derive(Debug, Clone, Default, Args)]
pub struct TailnetArgs {
    /// Read the Tailscale auth key from this file instead of TS_AUTHKEY (there is deliberately no
    /// flag that takes the key itself: argv is visible to every process).
    #[arg(long, value_name = "PATH")]
    pub auth_key_file: Option<PathBuf>,

    /// Tailnet hostname of the sandbox [env: TS_HOSTNAME; default: modal-<sandbox id>].
    #[arg(long)]
    pub hostname: Option<String>,

    /// Control server URL, e.g. a headscale server [env: TS_CONTROL_URL].
    #[arg(long, value_name = "URL")]
    pub control_url: Option<String>,

    /// Path of tailscaled inside the sandbox, tried before PATH.
    #[arg(long, value_name = "PATH")]
    pub tailscaled: Option<String>,

    /// tailscaled's LocalAPI socket inside the sandbox [env: TS_SOCKET_PATH; default: a private
    /// directory per run].
    #[arg(long, value_name = "PATH")]
    pub tailscaled_socket: Option<String>,

    /// tailscaled's --state inside the sandbox: `mem:` (an ephemeral node) or a file path
    /// [env: TS_STATE_PATH; default: mem:].
    #[arg(long, value_name = "STATE")]
    pub tailscaled_state: Option<String>,

    /// tailscaled's --statedir inside the sandbox [default: a private directory per run].
    #[arg(long, value_name = "DIR")]
    pub tailscaled_statedir: Option<String>,

    /// Tags the sandbox's node advertises, e.g. tag:ci (the auth key must allow them). Repeatable.
    #[arg(long = "advertise-tag", value_name = "TAG")]
    pub advertise_tags: Vec<String>,

    /// Tailscale release tarball (tailscale_<version>_amd64.tgz, or _arm64 for aarch64 sandboxes;
    /// checked against the sandbox before pushing) whose tailscaled and tailscale are pushed into
    /// the sandbox, for images without them [env: TAILBOX_TAILSCALE_TARBALL].
    #[arg(long, value_name = "TGZ")]
    pub tailscale_tarball: Option<PathBuf>,

    /// Listener for tailscaled's SOCKS5 and HTTP proxy inside the sandbox, as IP:port; port 0 lets
    /// tailscaled pick one [default: 127.0.0.1:1055].
    #[arg(long, value_name = "ADDR")]
    pub proxy_listen: Option<std::net::SocketAddr>,

    /// Budget for logging in to the tailnet [default: 120s].
    #[arg(long, value_parser = parse_duration)]
    pub login_timeout: Option<Duration>,
}

/// Flags of `tailbox check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub sandbox: SandboxArgs,

    /// Check this many sandboxes at once (fan-out), each with its own hostname; the summary
    /// and `--report` then hold the aggregated report.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000), conflicts_with = "sandbox_id")]
    pub count: Option<u32>,

    /// How many sandboxes of a fan-out run at once [default: N, at most 8].
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub parallel: Option<u32>,

    /// Write one JSON object per event to stdout, the final report last (with several
    /// sandboxes: each line a FleetEvent with its sandbox id, the aggregated report last).
    #[arg(long)]
    pub json: bool,

    /// Also write the final report, as JSON, to this file.
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,

    /// After the run, print a waterfall of each sandbox's phases on stderr.
    #[arg(long)]
    pub timeline: bool,

    /// Also write the report as one self-contained HTML page to this file: the waterfall, the
    /// latency histograms of a fan-out, the checks with failures first, and every hint.
    #[arg(long, value_name = "PATH")]
    pub report_html: Option<PathBuf>,

    /// The dev host to ping: its tailnet IP, or its name (host name, MagicDNS name or FQDN),
    /// looked up in the netmap [env: COOK_TAIL_IP]. Repeatable.
    #[arg(long = "ping", value_name = "HOST")]
    pub ping: Vec<String>,

    /// URL to fetch over the tailnet, e.g. http://100.64.0.1:7420/health [env: COOK_HTTP_URL].
    /// Any 2xx passes, after up to 5 redirects. To expect another status, put it before the URL:
    /// a code (`302=URL`: that redirect passes and is not followed) or an inclusive range
    /// (`200-399=URL`). Repeatable.
    #[arg(long = "http", value_name = "[STATUS=]URL")]
    pub http: Vec<String>,

    /// git remote to list over the tailnet [env: COOK_GIT_URL]. Repeatable.
    #[arg(long = "git", value_name = "URL")]
    pub git: Vec<String>,

    /// Ref the git remotes must advertise with this sha, as NAME=SHA (NAME may be a branch name,
    /// a full ref such as refs/tags/v1, or HEAD). Repeatable.
    #[arg(long = "expect-ref", value_name = "NAME=SHA")]
    pub expect_ref: Vec<String>,

    #[command(flatten)]
    pub tailnet: TailnetArgs,

    /// Start a one-shot agent even if a sidecar runs in the sandbox (it starts its own tailscaled).
    #[arg(long)]
    pub no_sidecar: bool,

    /// Leave the sandbox running at the end [env: KEEP_SANDBOX=1].
    #[arg(long)]
    pub keep: bool,

    /// Budget for the whole run.
    #[arg(long, value_parser = parse_duration, default_value = "15m")]
    pub timeout: Duration,

    /// Budget for the target to appear online in the netmap [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    pub netmap_timeout: Option<Duration>,

    /// Budget for each ping check [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    pub ping_timeout: Option<Duration>,

    /// Budget for each HTTP check [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    pub http_timeout: Option<Duration>,

    /// Budget for each git check [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    pub git_timeout: Option<Duration>,

    /// Show the agent's own log lines (prefixed `agent:`) and tailscaled's, and every check's
    /// whole detail (on a terminal, live lines are otherwise cut to its width).
    #[arg(short, long)]
    pub verbose: bool,

    /// Print only the results table (no live progress).
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
}

/// Flags of `tailbox up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub sandbox: SandboxArgs,

    #[command(flatten)]
    pub tailnet: TailnetArgs,

    /// Print one JSON object as the last stdout line: sandbox_id, hostname, tailnet_ips,
    /// proxy_url, env and the sidecar's status.
    #[arg(long)]
    pub json: bool,

    /// Take down a sidecar of another version running in the sandbox and start this one.
    #[arg(long)]
    pub replace: bool,

    /// Leave a sandbox tailbox created running even if `up` fails.
    #[arg(long)]
    pub keep: bool,

    /// How long a sandbox tailbox creates may live; Modal terminates it then, whatever runs in it.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub lifetime: Duration,

    /// Budget for the sandbox, the sidecar and the login together.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub timeout: Duration,

    /// Show the agent's own log lines.
    #[arg(short, long)]
    pub verbose: bool,
}

/// Flags of `tailbox status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub sandbox: SandboxArgs,

    /// Print the status as one JSON object (the proto3 JSON of the sidecar's `SidecarStatus`,
    /// with the sandbox id).
    #[arg(long)]
    pub json: bool,
}

/// Flags of `tailbox down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    #[command(flatten)]
    pub sandbox: SandboxArgs,

    /// Leave the sandbox running (only the sidecar and its node go).
    #[arg(long)]
    pub keep: bool,

    /// Time for the logout and for stopping tailscaled.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub grace: Duration,

    /// Print the outcome as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 90s, 2m, 1h30m)"))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}
