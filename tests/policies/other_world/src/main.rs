//! A WASI command component (world `wasi:cli/command`): valid WebAssembly, wrong world.
fn main() {
    println!("not a policy");
}
