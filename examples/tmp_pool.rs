use sparseflow::ops::neuron::{Firing, LIFNode};
use sparseflow::ops::pool::MaxPool2d;
use sparseflow::ops::Operator;
use sparseflow::testing::{random_spikes, random_uniform};
fn main() {
    let x = random_spikes(&[4, 1, 64, 112, 112], 0.05, 1);
    let pool = MaxPool2d::new((3, 3), (2, 2), (1, 1)).unwrap();
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let y = pool.forward(&[&x]).unwrap();
        println!(
            "maxpool {:.2} ms {}",
            t.elapsed().as_secs_f64() * 1e3,
            y.len()
        );
    }
    let h = random_uniform(&[4, 1, 64, 112, 112], -1.0, 2.0, 2);
    let lif = LIFNode::new(2.0, true, Firing::default()).unwrap();
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let y = lif.forward(&[&h]).unwrap();
        println!("lif {:.2} ms {}", t.elapsed().as_secs_f64() * 1e3, y.len());
    }
}
