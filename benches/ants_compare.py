"""Re-measures ANTs on the bundled real pair, for side-by-side figures with voxflow's bench.

Not part of the build or the tests: run it in a throw-away environment with antspyx and
nibabel installed (`python -m venv /tmp/ants && /tmp/ants/bin/pip install antspyx==0.6.3
nibabel`), from the repository root, with 2 threads, right before or after
`cargo bench --bench register` so both see the same machine load:

    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=2 /tmp/ants/bin/python benches/ants_compare.py [2mm]

It registers fsaverage's brain to the OASIS-style subject (whose header is corrected to its
true L-I-A orientation, as the pipeline does) with ANTs `SyN` defaults, carries the aseg
labels with nearest-neighbour interpolation into the subject's 1 mm grid, and prints the
mean Dice on the 30 standard labels and the whole-process seconds. With `2mm` both images
are first resampled to 2 mm copies (labels are still scored at 1 mm).
"""

import sys
import time

START = time.time()

import ants  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

LABELS = [2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31,
          41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 60, 63]
DATA = "../shared/data"


def lia_affine(shape):
    """The subject's true geometry: L-I-A axes, 1 mm, centred on the origin."""
    m = np.array([[-1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1.0]])
    centre = m[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    m[:3, 3] = -centre
    return m


def to_ants(array, affine):
    """An ANTs image from a numpy array and a RAS affine (ANTs works in LPS)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return ants.from_numpy(array.astype(np.float32), origin=list(lps[:3, 3]),
                           spacing=list(spacing), direction=direction)


def main():
    coarse = len(sys.argv) > 1 and sys.argv[1] == "2mm"
    subj = nib.load(f"{DATA}/oasis_like_subject/norm.nii.gz")
    seg = nib.load(f"{DATA}/oasis_like_subject/seg.nii.gz")
    affine = lia_affine(subj.shape)
    fixed = to_ants(subj.get_fdata(), affine)
    truth = np.asarray(seg.dataobj).astype(np.int32)

    brain = nib.load(f"{DATA}/fsaverage/brain.mgz")
    aseg = nib.load(f"{DATA}/fsaverage/aseg.mgz")
    moving = to_ants(brain.get_fdata(), brain.affine)
    moving_labels = to_ants(aseg.get_fdata(), aseg.affine)

    fixed_reg, moving_reg = fixed, moving
    if coarse:
        fixed_reg = ants.resample_image(fixed, (2, 2, 2), use_voxels=False, interp_type=0)
        moving_reg = ants.resample_image(moving, (2, 2, 2), use_voxels=False, interp_type=0)

    t0 = time.time()
    reg = ants.registration(fixed=fixed_reg, moving=moving_reg, type_of_transform="SyN")
    t_reg = time.time() - t0
    warped = ants.apply_transforms(fixed=fixed, moving=moving_labels,
                                   transformlist=reg["fwdtransforms"],
                                   interpolator="nearestNeighbor")
    pred = np.rint(warped.numpy()).astype(np.int32)

    dices = []
    for label in LABELS:
        a, b = pred == label, truth == label
        if a.sum() + b.sum() > 0:
            dices.append(2.0 * (a & b).sum() / (a.sum() + b.sum()))
    whole = time.time() - START
    res = "2mm" if coarse else "1mm"
    print(f"ANTs SyN {res}: mean Dice {np.mean(dices):.3f} on {len(dices)} labels, "
          f"registration {t_reg:.1f} s, whole process {whole:.1f} s")


if __name__ == "__main__":
    main()
