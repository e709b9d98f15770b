//! `palisade`: the offline CLI.
fn main() {
    print!("{}", palisade::api::crds_yaml().expect("crd"));
}
