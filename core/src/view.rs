//! Strided views: a group of values read out of a larger array without copying it.
//!
//! A per-channel key group is `len` tokens of one channel (`stride` = row width); a per-token value group
//! is `len` consecutive channels of one token (`stride` = 1). The constructors check that every index the
//! view touches lies inside the slice, so element access cannot go out of bounds afterwards.

use crate::error::{Error, Result};

/// Last index a view of `len` elements from `offset` with `stride` touches, checked against `slice_len`.
fn check(slice_len: usize, offset: usize, stride: usize, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let last = (len - 1).checked_mul(stride).and_then(|x| x.checked_add(offset)).unwrap_or(usize::MAX);
    if last >= slice_len { Err(Error::OutOfBounds { index: last, len: slice_len }) } else { Ok(()) }
}

/// A read-only strided view: element `i` is `data[offset + i * stride]`.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a> {
    data: &'a [f32],
    offset: usize,
    stride: usize,
    len: usize,
}

impl<'a> Strided<'a> {
    /// A view of `len` elements of `data` starting at `offset`, `stride` apart.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] if the last element lies past the end of `data`.
    pub fn new(data: &'a [f32], offset: usize, stride: usize, len: usize) -> Result<Self> {
        check(data.len(), offset, stride, len)?;
        Ok(Self { data, offset, stride, len })
    }

    /// The whole slice, contiguous.
    pub fn contiguous(data: &'a [f32]) -> Self {
        Self { data, offset: 0, stride: 1, len: data.len() }
    }

    /// Number of elements.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Element `i` (`i < len`, else this panics like slice indexing).
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        assert!(i < self.len, "strided index {i} out of range {}", self.len);
        self.data[self.offset + i * self.stride]
    }

    /// The elements in order.
    pub fn iter(&self) -> impl Iterator<Item = f32> + '_ {
        (0..self.len).map(move |i| self.data[self.offset + i * self.stride])
    }

    /// Minimum and maximum, or the index of the first non-finite element.
    ///
    /// # Errors
    /// [`Error::NonFinite`]; [`Error::EmptyInput`] for an empty view.
    pub fn min_max(&self) -> Result<(f32, f32)> {
        if self.len == 0 {
            return Err(Error::EmptyInput { what: "group" });
        }
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for (index, x) in self.iter().enumerate() {
            if !x.is_finite() {
                return Err(Error::NonFinite { index });
            }
            lo = lo.min(x);
            hi = hi.max(x);
        }
        Ok((lo, hi))
    }
}

/// A mutable strided view: element `i` is `data[offset + i * stride]`.
#[derive(Debug)]
pub struct StridedMut<'a> {
    data: &'a mut [f32],
    offset: usize,
    stride: usize,
    len: usize,
}

impl<'a> StridedMut<'a> {
    /// A view of `len` elements of `data` starting at `offset`, `stride` apart.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] if the last element lies past the end of `data`.
    pub fn new(data: &'a mut [f32], offset: usize, stride: usize, len: usize) -> Result<Self> {
        check(data.len(), offset, stride, len)?;
        Ok(Self { data, offset, stride, len })
    }

    /// The whole slice, contiguous.
    pub fn contiguous(data: &'a mut [f32]) -> Self {
        let len = data.len();
        Self { data, offset: 0, stride: 1, len }
    }

    /// Number of elements.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A mutable reference to element `i` (`i < len`, else this panics like slice indexing).
    #[inline]
    pub fn at(&mut self, i: usize) -> &mut f32 {
        assert!(i < self.len, "strided index {i} out of range {}", self.len);
        &mut self.data[self.offset + i * self.stride]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked_up_front() {
        let d = [0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let v = Strided::new(&d, 1, 3, 2).unwrap();
        assert_eq!(v.iter().collect::<heapless::Vec<f32, 4>>().as_slice(), &[1.0, 4.0]);
        assert_eq!(Strided::new(&d, 1, 3, 3).unwrap_err(), Error::OutOfBounds { index: 7, len: 7 });
        assert!(Strided::new(&d, 7, 1, 0).is_ok());
        assert!(matches!(Strided::new(&d, 0, usize::MAX, 3), Err(Error::OutOfBounds { .. })));
        let bad = [1.0f32, f32::NAN];
        assert_eq!(Strided::contiguous(&bad).min_max(), Err(Error::NonFinite { index: 1 }));
    }
}
