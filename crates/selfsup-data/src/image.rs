//! The in-memory image type every transform works on.

/// An 8-bit image in planar CHW layout (`data[c * h * w + y * w + x]`), as CIFAR-10 stores it.
///
/// Kept as `u8` (four times smaller than `f32`); conversion to `f32` happens once per view in
/// [`crate::Normalize`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Pixel bytes, `channels * height * width` of them, plane after plane.
    pub data: Vec<u8>,
    /// Number of channels (1 or 3).
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
}

impl Image {
    /// Wrap CHW bytes; panics if the length does not match (a programming error).
    pub fn new(data: Vec<u8>, channels: usize, height: usize, width: usize) -> Self {
        assert_eq!(
            data.len(),
            channels * height * width,
            "image buffer of {} bytes does not hold {channels}x{height}x{width}",
            data.len()
        );
        Self {
            data,
            channels,
            height,
            width,
        }
    }

    /// An all-zero image.
    pub fn zeros(channels: usize, height: usize, width: usize) -> Self {
        Self::new(vec![0; channels * height * width], channels, height, width)
    }

    /// Pixels in one plane.
    pub fn plane_len(&self) -> usize {
        self.height * self.width
    }

    /// One channel as a slice.
    pub fn plane(&self, c: usize) -> &[u8] {
        let n = self.plane_len();
        &self.data[c * n..(c + 1) * n]
    }

    /// Convert from an `image::RgbImage` (HWC) to planar CHW.
    pub fn from_rgb(img: &image::RgbImage) -> Self {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut data = vec![0u8; 3 * h * w];
        let n = h * w;
        for (i, px) in img.pixels().enumerate() {
            data[i] = px[0];
            data[n + i] = px[1];
            data[2 * n + i] = px[2];
        }
        Self::new(data, 3, h, w)
    }

    /// Convert to an `image::RgbImage` (HWC), repeating a single channel if needed.
    pub fn to_rgb(&self) -> image::RgbImage {
        let n = self.plane_len();
        let mut out = image::RgbImage::new(self.width as u32, self.height as u32);
        for (i, px) in out.pixels_mut().enumerate() {
            for c in 0..3 {
                let src = if self.channels == 1 { 0 } else { c };
                px[c] = self.data[src * n + i];
            }
        }
        out
    }
}
