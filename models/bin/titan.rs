//! `titan`: one binary per node. The engine's command line with this crate's models.

fn main() -> std::process::ExitCode {
    titan_engine::cli::main(titan::registry())
}
