//! NIfTI-1 geometry: the qform quaternion to and from an affine, and the pixdim-only fallback.
//!
//! Conventions follow nibabel, so affines agree with the Python tools users check against:
//! `pixdim[1..=3]` are taken as magnitudes (zero or non-finite sizes become 1), `pixdim[0]`
//! (qfac) is -1 or else 1, and a file with neither transform gets nibabel's Analyze-style
//! fallback (x flipped, volume centred on the origin).

use nalgebra::{Matrix3, Vector3};

use crate::volume::Affine;

/// The qform fields of a NIfTI-1 header.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Qform {
    /// Quaternion `b`, `c`, `d` (`a` is implied and non-negative).
    pub(crate) bcd: [f64; 3],
    /// `pixdim[0]`: -1 when the third axis is reversed (left-handed grid), else 1.
    pub(crate) qfac: f64,
    /// `pixdim[1..=3]`.
    pub(crate) pixdim: [f64; 3],
    /// `qoffset_x`, `qoffset_y`, `qoffset_z`.
    pub(crate) offset: [f64; 3],
}

/// A voxel size as nibabel fixes it: its magnitude, or 1 when zero or not finite.
pub(crate) fn fixed_pixdim(p: f64) -> f64 {
    if p.is_finite() && p != 0.0 {
        p.abs()
    } else {
        1.0
    }
}

/// qfac as nibabel fixes it: -1 stays, anything else means 1.
pub(crate) fn fixed_qfac(p: f64) -> f64 {
    if p == -1.0 { -1.0 } else { 1.0 }
}

/// The affine a qform describes: rotation from the quaternion, times
/// `diag(pixdim[1], pixdim[2], qfac * pixdim[3])`, plus the offset.
pub(crate) fn qform_to_affine(q: &Qform) -> Affine {
    let [b, c, d] = q.bcd;
    // Rounding can push b²+c²+d² slightly above 1; `a` is then 0 and the rotation is a half
    // turn, which the normalisation below handles as nifti1_io does.
    let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
    let norm = a * a + b * b + c * c + d * d;
    let rot = if norm < 1e-12 {
        Matrix3::identity()
    } else {
        let s = 2.0 / norm;
        Matrix3::new(
            1.0 - s * (c * c + d * d),
            s * (b * c - a * d),
            s * (b * d + a * c),
            s * (b * c + a * d),
            1.0 - s * (b * b + d * d),
            s * (c * d - a * b),
            s * (b * d - a * c),
            s * (c * d + a * b),
            1.0 - s * (b * b + c * c),
        )
    };
    let zooms = Vector3::new(q.pixdim[0], q.pixdim[1], q.qfac * q.pixdim[2]);
    let lin = rot * Matrix3::from_diagonal(&zooms);
    let mut m = Affine::identity();
    m.fixed_view_mut::<3, 3>(0, 0).copy_from(&lin);
    for r in 0..3 {
        m[(r, 3)] = q.offset[r];
    }
    m
}

/// The qform for `m` when its linear part is a rotation (proper or not) times positive
/// scales; `None` for sheared or degenerate affines, which a qform cannot express.
pub(crate) fn affine_to_qform(m: &Affine) -> Option<Qform> {
    let lin: Matrix3<f64> = m.fixed_view::<3, 3>(0, 0).into_owned();
    let zooms = [
        lin.column(0).norm(),
        lin.column(1).norm(),
        lin.column(2).norm(),
    ];
    if zooms.iter().any(|z| !z.is_finite() || *z < 1e-12) {
        return None;
    }
    let mut rot = lin * Matrix3::from_diagonal(&Vector3::from(zooms.map(|z| 1.0 / z)));
    let qfac = if rot.determinant() < 0.0 { -1.0 } else { 1.0 };
    rot.column_mut(2).scale_mut(qfac);
    let off_identity = (rot.transpose() * rot - Matrix3::identity()).abs().max();
    if off_identity > 1e-5 {
        return None;
    }
    Some(Qform {
        bcd: quaternion_bcd(&rot),
        qfac,
        pixdim: zooms,
        offset: [m[(0, 3)], m[(1, 3)], m[(2, 3)]],
    })
}

/// `b`, `c`, `d` of the unit quaternion (with `a >= 0`) of a proper rotation matrix.
fn quaternion_bcd(r: &Matrix3<f64>) -> [f64; 3] {
    let trace = r[(0, 0)] + r[(1, 1)] + r[(2, 2)];
    // Branch on the largest of a, b, c, d so the division below is well conditioned.
    let (a, b, c, d) = if trace > 0.0 {
        let a = 0.5 * (1.0 + trace).sqrt();
        let k = 0.25 / a;
        (
            a,
            k * (r[(2, 1)] - r[(1, 2)]),
            k * (r[(0, 2)] - r[(2, 0)]),
            k * (r[(1, 0)] - r[(0, 1)]),
        )
    } else if r[(0, 0)] >= r[(1, 1)] && r[(0, 0)] >= r[(2, 2)] {
        let b = 0.5 * (1.0 + r[(0, 0)] - r[(1, 1)] - r[(2, 2)]).sqrt();
        let k = 0.25 / b;
        (
            k * (r[(2, 1)] - r[(1, 2)]),
            b,
            k * (r[(0, 1)] + r[(1, 0)]),
            k * (r[(0, 2)] + r[(2, 0)]),
        )
    } else if r[(1, 1)] >= r[(2, 2)] {
        let c = 0.5 * (1.0 - r[(0, 0)] + r[(1, 1)] - r[(2, 2)]).sqrt();
        let k = 0.25 / c;
        (
            k * (r[(0, 2)] - r[(2, 0)]),
            k * (r[(0, 1)] + r[(1, 0)]),
            c,
            k * (r[(1, 2)] + r[(2, 1)]),
        )
    } else {
        let d = 0.5 * (1.0 - r[(0, 0)] - r[(1, 1)] + r[(2, 2)]).sqrt();
        let k = 0.25 / d;
        (
            k * (r[(1, 0)] - r[(0, 1)]),
            k * (r[(0, 2)] + r[(2, 0)]),
            k * (r[(1, 2)] + r[(2, 1)]),
            d,
        )
    };
    if a < 0.0 { [-b, -c, -d] } else { [b, c, d] }
}

/// nibabel's affine for a file with neither qform nor sform: voxel sizes on the diagonal, x
/// flipped (Analyze's radiological LAS), and the centre of the grid at the world origin.
pub(crate) fn pixdim_affine(shape: [usize; 3], zooms: [f64; 3]) -> Affine {
    let mut m = Affine::identity();
    let signed = [-zooms[0], zooms[1], zooms[2]];
    for r in 0..3 {
        m[(r, r)] = signed[r];
        m[(r, 3)] = -(shape[r] as f64 - 1.0) / 2.0 * signed[r];
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::Rotation3;

    fn close(a: &Affine, b: &Affine, tol: f64) -> bool {
        (a - b).abs().max() < tol
    }

    #[test]
    fn identity_quaternion_gives_scaled_identity() {
        let q = Qform {
            bcd: [0.0; 3],
            qfac: 1.0,
            pixdim: [2.0, 3.0, 4.0],
            offset: [1.0, 2.0, 3.0],
        };
        let m = qform_to_affine(&q);
        assert_eq!(m[(0, 0)], 2.0);
        assert_eq!(m[(2, 2)], 4.0);
        assert_eq!(m[(1, 3)], 2.0);
    }

    #[test]
    fn negative_qfac_reverses_third_axis() {
        let q = Qform {
            bcd: [0.0; 3],
            qfac: -1.0,
            pixdim: [1.5, 1.5, 2.5],
            offset: [0.0; 3],
        };
        assert_eq!(qform_to_affine(&q)[(2, 2)], -2.5);
    }

    #[test]
    fn rotations_round_trip_through_qform() {
        let angles = [
            (0.0, 0.0, 0.0),
            (0.3, -0.2, 1.0),
            (3.1, 0.1, -2.9),
            (1.57, 1.57, 0.0),
        ];
        for (roll, pitch, yaw) in angles {
            for flip in [1.0, -1.0] {
                let rot = Rotation3::from_euler_angles(roll, pitch, yaw).into_inner();
                let lin = rot * Matrix3::from_diagonal(&Vector3::new(1.2, 0.9, 2.5 * flip));
                let mut m = Affine::identity();
                m.fixed_view_mut::<3, 3>(0, 0).copy_from(&lin);
                m[(0, 3)] = -10.0;
                m[(2, 3)] = 7.5;
                let q = affine_to_qform(&m).expect("a rotation times scales");
                assert!(
                    close(&qform_to_affine(&q), &m, 1e-9),
                    "{roll} {pitch} {yaw} {flip}"
                );
            }
        }
    }

    #[test]
    fn sheared_affine_has_no_qform() {
        let mut m = Affine::identity();
        m[(0, 1)] = 0.25;
        assert!(affine_to_qform(&m).is_none());
    }

    #[test]
    fn fallback_matches_nibabel() {
        let m = pixdim_affine([12, 14, 10], [2.0, 3.0, 4.0]);
        assert_eq!(
            (m[(0, 0)], m[(0, 3)], m[(1, 3)], m[(2, 3)]),
            (-2.0, 11.0, -19.5, -18.0)
        );
    }
}
