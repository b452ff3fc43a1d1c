use clap::Parser;

fn main() {
    let cli = duplex::cli::Cli::parse();
    if let Err(e) = duplex::cli::run(cli) {
        eprintln!("duplex: {e:#}");
        std::process::exit(1);
    }
}
