//! `dtb`, the operator command line of diesel_transaction_barrier (feature `cli`): see the
//! `cli` module's documentation, or `dtb --help`.

fn main() -> std::process::ExitCode {
    diesel_transaction_barrier::cli::main()
}
