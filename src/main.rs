fn main() {
    println!("custos (being written)");
}
