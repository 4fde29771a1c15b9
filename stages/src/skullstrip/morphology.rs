//! Binary morphology on masks, with radii in millimetres.
//!
//! Masks are [`Volume`]s holding 0 and 1; a voxel is inside when its value is at least 0.5,
//! so a mask carried over to another grid by linear interpolation can be passed as it is.
//! Dilation and erosion by a ball of radius `r` mm are thresholds of an exact Euclidean
//! distance transform computed with each axis's voxel size, so their cost does not grow
//! with the radius and they agree between 1 mm and anisotropic grids.
//!
//! Connectivity is the 6-neighbourhood throughout (faces only): the strictest one, which keeps
//! one-voxel diagonal contacts between brain and scalp from joining them. Flood fills and
//! labelling use explicit queues, never recursion, so no mask can overflow the stack.
//!
//! The edge of the grid does not count as background for erosion: a brain that touches the
//! last slice (as the MNI152 brainstem does) is not eaten from that side, and a closing keeps
//! it. Hole filling floods from the grid edge, so a cavity open to the edge stays open.

use std::collections::VecDeque;

use rayon::prelude::*;

use crate::volume::Volume;

use super::lines::squared_distance;

/// The inside/outside state of each voxel of a mask volume (inside: value ≥ 0.5).
pub(crate) fn to_bits(mask: &Volume) -> Vec<bool> {
    mask.frame(0).iter().map(|&x| x >= 0.5).collect()
}

/// A 0/1 volume on `like`'s grid from per-voxel states.
pub(crate) fn from_bits(like: &Volume, bits: &[bool]) -> Volume {
    like.with_data(bits.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect())
}

/// Bits of `mask` dilated by a ball of `mm` millimetres.
pub(crate) fn dilate_bits(
    bits: &[bool],
    shape: [usize; 3],
    spacing: [f64; 3],
    mm: f64,
) -> Vec<bool> {
    if mm <= 0.0 {
        return bits.to_vec();
    }
    let r2 = (mm * mm) as f32 * (1.0 + 1e-5);
    squared_distance(bits, shape, spacing)
        .iter()
        .map(|&d| d <= r2)
        .collect()
}

/// Bits of `mask` eroded by a ball of `mm` millimetres (the grid edge is not background).
pub(crate) fn erode_bits(
    bits: &[bool],
    shape: [usize; 3],
    spacing: [f64; 3],
    mm: f64,
) -> Vec<bool> {
    // Erosion is the complement of the background dilated by the same ball.
    let outside: Vec<bool> = bits.iter().map(|&b| !b).collect();
    dilate_bits(&outside, shape, spacing, mm)
        .into_iter()
        .map(|b| !b)
        .collect()
}

/// Closing (dilate then erode) of bits by `mm` millimetres.
pub(crate) fn close_bits(
    bits: &[bool],
    shape: [usize; 3],
    spacing: [f64; 3],
    mm: f64,
) -> Vec<bool> {
    let d = dilate_bits(bits, shape, spacing, mm);
    erode_bits(&d, shape, spacing, mm)
}

/// Opening (erode then dilate) of bits by `mm` millimetres.
pub(crate) fn open_bits(bits: &[bool], shape: [usize; 3], spacing: [f64; 3], mm: f64) -> Vec<bool> {
    let e = erode_bits(bits, shape, spacing, mm);
    let d = dilate_bits(&e, shape, spacing, mm);
    d.iter().zip(bits).map(|(&a, &b)| a && b).collect()
}

/// The 6-neighbours of linear index `idx` in a grid of `shape`, calling `f` on each.
#[inline]
fn neighbours(idx: usize, shape: [usize; 3], mut f: impl FnMut(usize)) {
    let [ni, nj, nk] = shape;
    let plane = ni * nj;
    let i = idx % ni;
    let j = (idx / ni) % nj;
    let k = idx / plane;
    if i > 0 {
        f(idx - 1);
    }
    if i + 1 < ni {
        f(idx + 1);
    }
    if j > 0 {
        f(idx - ni);
    }
    if j + 1 < nj {
        f(idx + ni);
    }
    if k > 0 {
        f(idx - plane);
    }
    if k + 1 < nk {
        f(idx + plane);
    }
}

/// Labels the 6-connected components of `bits`: returns a label per voxel (0 outside,
/// 1.. inside) and the size of each label (index 0 unused).
pub(crate) fn label_components(bits: &[bool], shape: [usize; 3]) -> (Vec<u32>, Vec<usize>) {
    let mut labels = vec![0u32; bits.len()];
    let mut sizes = vec![0usize];
    let mut queue = Vec::new();
    for start in 0..bits.len() {
        if !bits[start] || labels[start] != 0 {
            continue;
        }
        let label = sizes.len() as u32;
        let mut size = 0;
        labels[start] = label;
        queue.push(start);
        while let Some(idx) = queue.pop() {
            size += 1;
            neighbours(idx, shape, |n| {
                if bits[n] && labels[n] == 0 {
                    labels[n] = label;
                    queue.push(n);
                }
            });
        }
        sizes.push(size);
    }
    (labels, sizes)
}

/// Keeps only the largest 6-connected component of `bits` (all false when empty).
pub(crate) fn largest_bits(bits: &[bool], shape: [usize; 3]) -> Vec<bool> {
    let (labels, sizes) = label_components(bits, shape);
    let Some((best, _)) = sizes.iter().enumerate().skip(1).max_by_key(|&(_, &s)| s) else {
        return vec![false; bits.len()];
    };
    let best = best as u32;
    labels.iter().map(|&l| l == best).collect()
}

/// Voxels of `allowed` 6-connected through `allowed` to some voxel of `seed ∧ allowed`
/// (morphological reconstruction by dilation).
pub(crate) fn reconstruct_bits(seed: &[bool], allowed: &[bool], shape: [usize; 3]) -> Vec<bool> {
    let mut out = vec![false; allowed.len()];
    let mut queue: VecDeque<usize> = VecDeque::new();
    for (idx, (&s, &a)) in seed.iter().zip(allowed).enumerate() {
        if s && a {
            out[idx] = true;
            queue.push_back(idx);
        }
    }
    while let Some(idx) = queue.pop_front() {
        neighbours(idx, shape, |n| {
            if allowed[n] && !out[n] {
                out[n] = true;
                queue.push_back(n);
            }
        });
    }
    out
}

/// Voxels of `allowed` within `max_mm` of `seed` along 6-connected paths through `allowed`
/// (each step costs its axis's voxel size), found by Dijkstra's algorithm. Path lengths are
/// city-block, so a diagonal reach is up to √3 shorter than `max_mm` in straight-line terms.
pub(crate) fn grow_bits(
    seed: &[bool],
    allowed: &[bool],
    shape: [usize; 3],
    spacing: [f64; 3],
    max_mm: f64,
) -> Vec<bool> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    // Limitation: 6-neighbour path lengths overstate diagonal distances (by up to √3), so
    // the reach is direction-dependent; acceptable for a bound that only needs to stop leaks.
    let mut dist = vec![f32::INFINITY; allowed.len()];
    let mut heap = BinaryHeap::new();
    for (idx, (&s, &a)) in seed.iter().zip(allowed).enumerate() {
        if s && a {
            dist[idx] = 0.0;
            heap.push(Reverse((0u32, idx)));
        }
    }
    let [ni, nj, _] = shape;
    let step = |from: usize, to: usize| {
        let d = from.abs_diff(to);
        if d == 1 {
            spacing[0]
        } else if d == ni {
            spacing[1]
        } else {
            debug_assert_eq!(d, ni * nj);
            spacing[2]
        }
    };
    while let Some(Reverse((d_bits, idx))) = heap.pop() {
        let d = f32::from_bits(d_bits);
        if d > dist[idx] {
            continue;
        }
        neighbours(idx, shape, |n| {
            let nd = d + step(idx, n) as f32;
            if allowed[n] && nd < dist[n] && nd as f64 <= max_mm {
                dist[n] = nd;
                // Non-negative floats order like their bit patterns.
                heap.push(Reverse((nd.to_bits(), n)));
            }
        });
    }
    dist.iter().map(|d| d.is_finite()).collect()
}

/// `bits` with every background region that does not reach the grid edge set inside.
pub(crate) fn fill_holes_bits(bits: &[bool], shape: [usize; 3]) -> Vec<bool> {
    let [ni, nj, nk] = shape;
    let on_edge = |idx: usize| {
        let (i, j, k) = (idx % ni, (idx / ni) % nj, idx / (ni * nj));
        i == 0 || j == 0 || k == 0 || i + 1 == ni || j + 1 == nj || k + 1 == nk
    };
    let background: Vec<bool> = bits.iter().map(|&b| !b).collect();
    let seed: Vec<bool> = (0..bits.len())
        .map(|idx| !bits[idx] && on_edge(idx))
        .collect();
    let outside = reconstruct_bits(&seed, &background, shape);
    outside.iter().map(|&o| !o).collect()
}

/// `bits` with the holes of every slice across `axis` filled (4-connected background in the
/// slice that does not reach the slice's edge becomes inside). Slices are independent and
/// filled in parallel.
pub(crate) fn fill_holes_2d(bits: &[bool], shape: [usize; 3], axis: usize) -> Vec<bool> {
    let (a, b) = match axis {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    let (na, nb) = (shape[a], shape[b]);
    let stride = [1, shape[0], shape[0] * shape[1]];
    let slices: Vec<(usize, Vec<bool>)> = (0..shape[axis])
        .into_par_iter()
        .map(|s| {
            let at = |x: usize, y: usize| s * stride[axis] + x * stride[a] + y * stride[b];
            let mut outside = vec![false; na * nb];
            let mut queue = Vec::new();
            for y in 0..nb {
                for x in 0..na {
                    let edge = x == 0 || y == 0 || x + 1 == na || y + 1 == nb;
                    if edge && !bits[at(x, y)] {
                        outside[x + na * y] = true;
                        queue.push((x, y));
                    }
                }
            }
            while let Some((x, y)) = queue.pop() {
                let mut visit = |x: usize, y: usize| {
                    if !outside[x + na * y] && !bits[at(x, y)] {
                        outside[x + na * y] = true;
                        queue.push((x, y));
                    }
                };
                if x > 0 {
                    visit(x - 1, y);
                }
                if x + 1 < na {
                    visit(x + 1, y);
                }
                if y > 0 {
                    visit(x, y - 1);
                }
                if y + 1 < nb {
                    visit(x, y + 1);
                }
            }
            (s, outside)
        })
        .collect();
    let mut out = bits.to_vec();
    for (s, outside) in slices {
        for y in 0..nb {
            for x in 0..na {
                if !outside[x + na * y] {
                    out[s * stride[axis] + x * stride[a] + y * stride[b]] = true;
                }
            }
        }
    }
    out
}

/// `mask` dilated by a ball of radius `mm` millimetres (Euclidean, in world units).
///
/// A voxel is in the result when some mask voxel lies within `mm` of it. Radii of zero or
/// less return the mask unchanged (as 0/1).
///
/// ```
/// use voxflow_stages::{skullstrip::dilate_mm, volume::{Affine, Volume}};
/// let mut m = Volume::new(vec![0.0; 125], [5, 5, 5], Affine::identity());
/// m.data[62] = 1.0; // the centre voxel
/// assert_eq!(dilate_mm(&m, 1.0).data.iter().sum::<f32>(), 7.0);
/// ```
pub fn dilate_mm(mask: &Volume, mm: f64) -> Volume {
    let bits = to_bits(mask);
    from_bits(mask, &dilate_bits(&bits, mask.shape, mask.voxel_size(), mm))
}

/// `mask` eroded by a ball of radius `mm` millimetres: a voxel stays when no background voxel
/// of the grid lies within `mm` of it. The grid edge does not count as background.
pub fn erode_mm(mask: &Volume, mm: f64) -> Volume {
    let bits = to_bits(mask);
    from_bits(mask, &erode_bits(&bits, mask.shape, mask.voxel_size(), mm))
}

/// Closing of `mask` by a ball of `mm` millimetres: fills gaps and dents narrower than the
/// ball, such as sulci, without growing the outline elsewhere.
pub fn close_mm(mask: &Volume, mm: f64) -> Volume {
    let bits = to_bits(mask);
    from_bits(mask, &close_bits(&bits, mask.shape, mask.voxel_size(), mm))
}

/// Opening of `mask` by a ball of `mm` millimetres: removes parts and bridges thinner than
/// the ball's diameter.
pub fn open_mm(mask: &Volume, mm: f64) -> Volume {
    let bits = to_bits(mask);
    from_bits(mask, &open_bits(&bits, mask.shape, mask.voxel_size(), mm))
}

/// The largest 6-connected component of `mask` (an all-zero volume when `mask` is empty).
pub fn largest_component(mask: &Volume) -> Volume {
    from_bits(mask, &largest_bits(&to_bits(mask), mask.shape))
}

/// `mask` with its holes filled: every background region that does not reach the edge of
/// the grid through 6-connected background becomes inside. A cavity open to the grid edge
/// is left alone.
pub fn fill_holes(mask: &Volume) -> Volume {
    from_bits(mask, &fill_holes_bits(&to_bits(mask), mask.shape))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Affine;

    fn ball(shape: [usize; 3], centre: [f64; 3], r: f64, vox: [f64; 3]) -> Volume {
        let mut data = vec![0.0f32; shape.iter().product()];
        for k in 0..shape[2] {
            for j in 0..shape[1] {
                for i in 0..shape[0] {
                    let d2 = ((i as f64 - centre[0]) * vox[0]).powi(2)
                        + ((j as f64 - centre[1]) * vox[1]).powi(2)
                        + ((k as f64 - centre[2]) * vox[2]).powi(2);
                    if d2 <= r * r {
                        data[i + shape[0] * (j + shape[1] * k)] = 1.0;
                    }
                }
            }
        }
        let mut a = Affine::identity();
        for (ax, v) in vox.iter().enumerate() {
            a[(ax, ax)] = *v;
        }
        Volume::new(data, shape, a)
    }

    fn volume_mm3(m: &Volume) -> f64 {
        let [a, b, c] = m.voxel_size();
        m.data.iter().filter(|&&x| x >= 0.5).count() as f64 * a * b * c
    }

    fn sphere_mm3(r: f64) -> f64 {
        4.0 / 3.0 * std::f64::consts::PI * r.powi(3)
    }

    #[test]
    fn dilating_a_sphere_by_r_mm_gives_the_bigger_sphere() {
        for vox in [[1.0, 1.0, 1.0], [1.0, 1.0, 2.5]] {
            let nk = (60.0 / vox[2]) as usize;
            let c = [30.0, 30.0, nk as f64 / 2.0];
            let d = dilate_mm(&ball([60, 60, nk], c, 12.0, vox), 6.0);
            let (got, want) = (volume_mm3(&d), sphere_mm3(18.0));
            // Sampling the small ball at 2.5 mm loses up to half a slice of reach, hence 6 %.
            assert!((got / want - 1.0).abs() < 0.06, "{vox:?}: {got} vs {want}");
            let bigger = ball([60, 60, nk], c, 18.0, vox);
            assert!(d.data.iter().zip(&bigger.data).all(|(&a, &b)| a <= b));
        }
    }

    #[test]
    fn eroding_a_sphere_by_r_mm_gives_the_smaller_sphere() {
        let s = ball([50, 50, 50], [25.0; 3], 18.0, [1.0; 3]);
        let got = volume_mm3(&erode_mm(&s, 6.0));
        let want = sphere_mm3(12.0);
        assert!((got / want - 1.0).abs() < 0.06, "{got} vs {want}");
    }

    #[test]
    fn erosion_does_not_eat_from_the_grid_edge() {
        let m = Volume::new(vec![1.0; 1000], [10, 10, 10], Affine::identity());
        assert_eq!(erode_mm(&m, 2.0).data, m.data);
    }

    #[test]
    fn closing_fills_a_narrow_slot_but_not_the_outline() {
        let mut m = ball([40, 40, 40], [20.0; 3], 15.0, [1.0; 3]);
        for k in 0..40 {
            for j in 19..21 {
                for i in 20..40 {
                    m.data[i + 40 * (j + 40 * k)] = 0.0;
                }
            }
        }
        let c = close_mm(&m, 3.0);
        assert_eq!(c.get(30, 20, 20), 1.0);
        assert_eq!(c.get(2, 2, 2), 0.0);
    }

    #[test]
    fn largest_component_picks_the_big_blob() {
        let big = ball([40, 40, 40], [12.0; 3], 8.0, [1.0; 3]);
        let small = ball([40, 40, 40], [32.0; 3], 4.0, [1.0; 3]);
        let both = big.with_data(
            big.data
                .iter()
                .zip(&small.data)
                .map(|(a, b)| a + b)
                .collect(),
        );
        assert_eq!(largest_component(&both).data, big.data);
        let empty = big.zeros_like();
        assert!(largest_component(&empty).data.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn hole_filling_fills_an_enclosed_cavity_but_not_an_open_one() {
        let outer = ball([30, 30, 30], [15.0; 3], 10.0, [1.0; 3]);
        let inner = ball([30, 30, 30], [15.0; 3], 5.0, [1.0; 3]);
        let shell: Vec<f32> = outer
            .data
            .iter()
            .zip(&inner.data)
            .map(|(a, b)| a - b)
            .collect();
        let closed = outer.with_data(shell.clone());
        assert_eq!(fill_holes(&closed).data, outer.data);

        // A tunnel from the cavity to the grid edge along +i keeps it open.
        let mut open = shell;
        for i in 15..30 {
            open[i + 30 * (15 + 30 * 15)] = 0.0;
        }
        let open = outer.with_data(open);
        assert_eq!(fill_holes(&open).data, open.data);
    }

    #[test]
    fn reconstruction_follows_connectivity_only() {
        let shape = [5, 1, 1];
        let allowed = [true, true, false, true, true];
        let seed = [true, false, false, false, false];
        assert_eq!(
            reconstruct_bits(&seed, &allowed, shape),
            vec![true, true, false, false, false]
        );
    }
}
