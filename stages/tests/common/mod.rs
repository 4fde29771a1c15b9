//! Helpers shared by the integration tests of this crate.

use voxflow_stages::volume::Volume;

/// `v` with Rician noise of standard deviation `sigma` (the magnitude of a complex signal
/// with Gaussian noise in both channels, as in a scanner's magnitude images: the background
/// is lifted to about 1.25 σ), from a fixed-seed generator.
pub fn rician(v: &Volume, sigma: f64) -> Volume {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut gaussian = move || {
        let (u, w) = (uniform(), uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * w).cos()
    };
    v.with_data(
        v.data
            .iter()
            .map(|&x| {
                let (re, im) = (x as f64 + sigma * gaussian(), sigma * gaussian());
                (re * re + im * im).sqrt() as f32
            })
            .collect(),
    )
}
