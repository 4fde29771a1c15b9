//! Skull stripping: finding the brain in a raw T1-weighted head, and mask morphology in mm.
//!
//! [`auto`] needs no atlas. [`refine_boundary`] snaps a mask that is a few millimetres off
//! (the atlas method's mask carried onto a subject) to the brain's edge. The morphology they
//! are built from ([`dilate_mm`], [`erode_mm`], [`open_mm`], [`close_mm`],
//! [`largest_component`], [`fill_holes`]) is public for other stages.
//!
//! # Design
//!
//! A classical pipeline of thresholds, distances and connectivity, chosen over a deformable
//! surface (BET) because every step is a whole-volume operation with a cost linear in the
//! voxel count and a meaning in millimetres, and over a learned model because the crate
//! ships no weights. The steps, and why:
//!
//! 0. **Noise.** A head whose air holds Rician noise above 1 % of the range (the mode of the
//!    dark values) is smoothed by a 1 mm Gaussian first: every later step thresholds single
//!    voxels. Clean heads are untouched.
//! 1. **Head and scalp.** The head is the largest component above a tenth of the robust range
//!    (and above four times the air's noise),
//!    holes filled in 3D and slice by slice (the dark skull layer is open to the edge of the
//!    field of view at the neck). Nothing within `scalp_mm` (7) of the air is brain: skin, fat
//!    and most of the skull are thinner than the distance from the outside to the cortex.
//! 2. **Levels.** Otsu's threshold over all voxels separates the dark classes (air, bone, CSF)
//!    from tissue; the median of the voxels in a sphere at the head's centre is the brain's
//!    level. Tissue starts `tissue_fraction` (0.15) of the way between them: Otsu's level
//!    lies near half the brain's median, so this still leaves CSF out but keeps cortex in
//!    partial volume with CSF, and the blurred cortex at the base of an averaged template
//!    (fsaverage's cerebellum and temporal poles were lost at 0.45). Grey and white matter
//!    are split by Otsu inside the tissue range.
//! 3. **Seed in white matter.** The brain's white matter is one large bright blob, while
//!    the face and neck hold muscle (grey-matter-like) and fat (brighter than white matter,
//!    above the tissue range). A 1.5 mm opening cuts the thin bright bridges and the largest
//!    piece is the seed. Starting from grey-and-white tissue instead (eroding it to cut
//!    bridges, then keeping the largest piece) leaked into the orbits and neck of fsaverage,
//!    whose averaged skull base leaves no dark gap at all (Dice 0.73–0.76 for erosions of 4
//!    to 9 mm).
//! 4. **Bounded growth.** Tissue is added along paths through tissue no longer than `grow_mm`
//!    (14) from the seed: enough for cortex and cerebellar folia, too short to run through
//!    the orbital roof far into the orbit or down the neck.
//! 5. **Boundary.** In a band of `search_mm` around that mask, tissue is opened (thin bridges
//!    to dura and skull go) and regrown from the mask's interior, closed by `closing_mm` (6;
//!    sulci), holes filled (ventricles).
//! 6. **CSF band.** T1 cannot tell CSF from cortical bone, so the inner skull surface is not
//!    visible; the mask takes `csf_fraction` (0.45) of the dark layer between the brain and
//!    the next brighter voxel outward (diploë or scalp), measured per voxel with two
//!    distance transforms, at most `csf_margin_mm` (6).
//!
//! # The three reference masks disagree, and what the defaults do about it
//!
//! Measured on `../shared/data` (see the tests and `benches/skullstrip.rs`): `ch2bet` hugs
//! the cortex (sulcal and outer CSF excluded), the MNI152 mask runs through the middle of
//! the dark layer, and fsaverage's `brain.mgz` reaches its outer edge: it is about 1 L larger
//! than the tissue it contains. Step 6 slides between these conventions, and so does
//! `tissue_fraction`, which decides how much of the blurred layer between brain and skull
//! counts as tissue. Dice colin27 / MNI152 / fsaverage for (`tissue_fraction`,
//! `csf_fraction`): (0.45, 0.55) 0.897 / 0.967 / 0.890 (the earlier defaults); (0.45, 0.5)
//! 0.908 / 0.968 / 0.883; (0.25, 0.5) 0.905 / 0.966 / 0.901; (0.15, 0.4) 0.921 / 0.967 /
//! 0.908; (0.1, 0.4) 0.917 / 0.965 / 0.917; the defaults (0.15, 0.45) 0.911 / 0.967 / 0.914.
//! The defaults balance the worst case between these three heads and are fitted to them, so
//! expect them to be off on other scans; set `csf_fraction` to 0 for BET-like masks, towards
//! 1 for FreeSurfer-like ones. Below 0.15 the mask starts to take in the temporal muscle and
//! the orbital roof of fsaverage.
//!
//! The atlas method ([`atlas`]) keeps the subject's own `auto` mask near the fused atlas
//! masks, so it inherits the same dilemma. [`fit_csf_fraction`] measures where a given mask
//! puts the edge, as the share that reproduces it: colin27's `ch2bet` 0.00 (Dice 0.951),
//! the MNI152 mask 0.45 (0.967), fsaverage's 0.65 (0.93). With `edge = "atlases"` the atlas
//! method gives each subject the mean share of its atlases, so a library of masks from one
//! tool yields that tool's edge. On the bundled leave-one-out evaluation that is worse, not
//! better (0.886 / 0.962 / 0.901): colin27 and fsaverage are the two extremes, so the other
//! two heads' mean is the far side for each. No method that sees only the other heads' masks
//! can reach 0.95 on colin27 and fsaverage together: the MNI152 mask laid on colin27 through
//! their shared MNI space, with no registration error at all, scores 0.906 against `ch2bet`,
//! and no share, even one chosen per head with the reference in hand, takes fsaverage past
//! 0.933 (`benches/skullstrip.rs` prints these tables).
//!
//! # Limitations
//!
//! - The levels assume a T1-weighted contrast (white brighter than grey brighter than CSF)
//!   and a moderate bias field; run [`crate::intensity::bias_correct`] first on a strongly
//!   shaded scan.
//! - A head cropped so tightly that the brain touches the air (an already stripped image,
//!   or a field of view through the vertex) loses the `scalp_mm` layer of brain there.
//! - Grid connectivity is 6-neighbour and path lengths in step 4 are city-block, so the reach
//!   along diagonals is up to √3 shorter than `grow_mm`.

mod atlas;
pub(crate) mod levels;
pub(crate) mod lines;
mod morphology;
mod strip;

pub use atlas::{AtlasHead, AtlasParams, Edge, atlas};
pub use morphology::{close_mm, dilate_mm, erode_mm, fill_holes, largest_component, open_mm};
pub use strip::{
    AutoParams, RefineParams, SkullStripError, StripResult, auto, dice, fit_csf_fraction,
    mask_volume_ml, refine_boundary,
};
