//! The `concertim-billing` command line: parses arguments, sets up logging, calls the library.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use concertim_billing::{
    billing::Ledger,
    config::Settings,
    executor::Executor,
    replay::{self, fixture, Counts, Report},
};

/// Turns OpenStack notifications (Keystone, Nova, Ceilometer) into billing: one account per
/// project, one subscription per instance, usage recorded exactly once.
#[derive(Parser)]
#[command(name = "concertim-billing", version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML). Without it the embedded default is used: every project
    /// billed, every flavor on `openstack-standard-monthly`, vCPU/memory/disk/instance hours.
    #[arg(long, global = true, env = "CONCERTIM_BILLING_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Feed captured notifications through decode → plan → billing, with no broker, and show
    /// what would be billed.
    ///
    /// PATHS are files or folders (searched recursively for .json and .jsonl files, in name
    /// order). Each .jsonl line is a captured delivery
    /// {"exchange","routing_key","properties","redelivered","body"}; a .json file holds one
    /// delivery, an oslo envelope, or a bare notification.
    ///
    /// Billing goes to the embedded ledger: in memory, or in FILE with --ledger, so that
    /// several replays add up and a second replay of the same messages changes nothing.
    ///
    /// Exit status: 0 when every message was processed or ignored, 3 when any was invalid or
    /// failed (each is listed on stderr with its file, line and reason), 2 on a usage error.
    #[command(
        after_help = "Examples:\n  concertim-billing replay fixtures/\n  concertim-billing replay --report json fixtures/nova-legacy\n  concertim-billing replay --ledger billing.json captured.jsonl\n  concertim-billing replay --ledger billing.json          # show what the ledger holds"
    )]
    Replay {
        /// Fixture files or folders.
        #[arg(value_name = "PATHS")]
        paths: Vec<PathBuf>,
        /// Keep the ledger in this file (created when missing; written atomically at the end).
        #[arg(long, value_name = "FILE")]
        ledger: Option<PathBuf>,
        /// Report format on stdout.
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        report: ReportFormat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ReportFormat {
    /// Tables for people.
    Text,
    /// One JSON object: counts, accounts, subscriptions, usage.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Replay { paths, ledger, report } => {
            if paths.is_empty() && ledger.is_none() {
                anyhow::bail!(
                    "nothing to replay: give fixture PATHS, or --ledger FILE to show a stored ledger (see --help)"
                );
            }
            let files = fixture::collect_files(&paths)?;
            let ledger = match &ledger {
                Some(path) => Ledger::open(path)?,
                None => Ledger::in_memory(),
            };
            let executor = Executor::new(settings, ledger);
            let runtime =
                tokio::runtime::Builder::new_current_thread().build().context("cannot start the async runtime")?;
            let counts: Counts = runtime.block_on(replay::replay_files(&executor, &files, |problem| {
                eprintln!("{problem}");
            }));
            executor.billing().persist()?;
            let output = Report::new(counts, executor.billing().snapshot());
            match report {
                ReportFormat::Text => print!("{}", output.to_text()),
                ReportFormat::Json => println!("{}", output.to_json()),
            }
            Ok(if counts.all_ok() { ExitCode::SUCCESS } else { ExitCode::from(3) })
        }
    }
}
