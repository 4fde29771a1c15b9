//! Turning stored voxel bytes into `f32` values, and `f32` values back into stored bytes.
//!
//! The datatype and byte order are matched once per volume; each arm then runs one
//! monomorphised loop over fixed-size byte chunks, with the header's scaling folded in, so
//! there is no per-voxel dispatch.

use crate::volume::DataType;

/// Bytes one stored value of `dtype` occupies.
pub(crate) fn size_of(dtype: DataType) -> usize {
    match dtype {
        DataType::Uint8 | DataType::Int8 => 1,
        DataType::Int16 | DataType::Uint16 => 2,
        DataType::Int32 | DataType::Uint32 | DataType::Float32 => 4,
        DataType::Int64 | DataType::Float64 => 8,
    }
}

/// Decodes `bytes` (a whole number of values of `dtype`) to `f32`, applying
/// `value * slope + inter` when the scaling is not the identity.
pub(crate) fn decode(
    bytes: &[u8],
    dtype: DataType,
    big_endian: bool,
    scaling: (f64, f64),
) -> Vec<f32> {
    macro_rules! decode_as {
        ($t:ty) => {
            if big_endian {
                convert(bytes, scaling, |b| <$t>::from_be_bytes(b) as f64)
            } else {
                convert(bytes, scaling, |b| <$t>::from_le_bytes(b) as f64)
            }
        };
    }
    match dtype {
        DataType::Uint8 => decode_as!(u8),
        DataType::Int8 => decode_as!(i8),
        DataType::Int16 => decode_as!(i16),
        DataType::Uint16 => decode_as!(u16),
        DataType::Int32 => decode_as!(i32),
        DataType::Uint32 => decode_as!(u32),
        DataType::Int64 => decode_as!(i64),
        DataType::Float32 => decode_as!(f32),
        DataType::Float64 => decode_as!(f64),
    }
}

/// One decoding loop for values of `N` bytes.
fn convert<const N: usize>(
    bytes: &[u8],
    (slope, inter): (f64, f64),
    value: impl Fn([u8; N]) -> f64,
) -> Vec<f32> {
    let (chunks, _) = bytes.as_chunks::<N>();
    if slope == 1.0 && inter == 0.0 {
        chunks.iter().map(|c| value(*c) as f32).collect()
    } else {
        chunks
            .iter()
            .map(|c| (value(*c) * slope + inter) as f32)
            .collect()
    }
}

/// Appends `values` to `out` as little-endian `dtype`. Integer types get rounded values,
/// saturated at the type's range, with NaN stored as 0.
pub(crate) fn encode_le(values: &[f32], dtype: DataType, out: &mut Vec<u8>) {
    macro_rules! encode_as {
        ($t:ty, |$v:ident| $conv:expr) => {
            for &$v in values {
                out.extend_from_slice(&<$t>::to_le_bytes($conv));
            }
        };
    }
    // `as` from float to integer saturates and maps NaN to 0, which is the documented rule.
    match dtype {
        DataType::Uint8 => encode_as!(u8, |v| v.round() as u8),
        DataType::Int8 => encode_as!(i8, |v| v.round() as i8),
        DataType::Int16 => encode_as!(i16, |v| v.round() as i16),
        DataType::Uint16 => encode_as!(u16, |v| v.round() as u16),
        DataType::Int32 => encode_as!(i32, |v| (v as f64).round() as i32),
        DataType::Uint32 => encode_as!(u32, |v| (v as f64).round() as u32),
        DataType::Int64 => encode_as!(i64, |v| (v as f64).round() as i64),
        DataType::Float32 => encode_as!(f32, |v| v),
        DataType::Float64 => encode_as!(f64, |v| v as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_endian_int16_is_swapped() {
        let v = decode(&[0x01, 0x02, 0xff, 0xfe], DataType::Int16, true, (1.0, 0.0));
        assert_eq!(v, vec![258.0, -2.0]);
    }

    #[test]
    fn scaling_is_applied_in_double_precision() {
        let v = decode(&[10, 0, 0, 0], DataType::Int32, false, (0.5, -1.0));
        assert_eq!(v, vec![4.0]);
    }

    #[test]
    fn encoding_rounds_and_saturates_integers() {
        let mut out = Vec::new();
        encode_le(&[1.6, -3.0, 1e9, f32::NAN], DataType::Int16, &mut out);
        let back = decode(&out, DataType::Int16, false, (1.0, 0.0));
        assert_eq!(back, vec![2.0, -3.0, 32767.0, 0.0]);
    }

    #[test]
    fn every_datatype_round_trips_small_integers() {
        use DataType::*;
        for dtype in [
            Uint8, Int8, Int16, Uint16, Int32, Uint32, Int64, Float32, Float64,
        ] {
            let mut out = Vec::new();
            encode_le(&[0.0, 7.0, 100.0], dtype, &mut out);
            assert_eq!(out.len(), 3 * size_of(dtype), "{dtype:?}");
            assert_eq!(
                decode(&out, dtype, false, (1.0, 0.0)),
                vec![0.0, 7.0, 100.0]
            );
        }
    }
}
