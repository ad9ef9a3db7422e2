fn main() {
    print!("{}", pushcluster_operator::crd_yaml().expect("yaml"));
}
