"""The demo federation (fednnunet.demo): deterministic, correct geometry, usable by stock nnU-Net."""
import dataclasses
import json
import os

import numpy as np
import pytest
from scipy import ndimage

from fednnunet import demo
from fednnunet.demo import (DEMO_DATASET_ID, DEMO_DATASET_NAME, TEST_SITES, build_demo_federation, generate_case,
                            site_shape, site_spacing_mm)
from fednnunet.federation import Federation

from conftest import point_nnunet_folder

SIZE = 32


def _read(path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    if os.path.basename(os.path.dirname(path)) == 'labelsTr':
        return SimpleITKIO().read_seg(path)
    return SimpleITKIO().read_images([path])


def _files(folder, case):
    return (os.path.join(folder, 'imagesTr', f'{case}_0000.nii.gz'), os.path.join(folder, 'labelsTr', f'{case}.nii.gz'))


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    raw = tmp_path_factory.mktemp('raw')
    folder = build_demo_federation(raw_root=str(raw), size=SIZE, seed=0, sites=TEST_SITES, verbose=False)
    return folder


def test_layout_dataset_json_and_sites(built):
    assert os.path.basename(built) == f'Dataset{DEMO_DATASET_ID:03d}_{DEMO_DATASET_NAME}'
    assert sorted(os.listdir(os.path.dirname(built))) == [os.path.basename(built)]  # no temp folder left
    with open(os.path.join(built, 'dataset.json')) as f:
        dj = json.load(f)
    n = sum(s.n_cases for s in TEST_SITES)
    assert dj['channel_names'] == {'0': 'T1'}
    assert dj['labels'] == {'background': 0, 'grey_matter': 1, 'white_matter': 2}
    assert dj['numTraining'] == n and dj['file_ending'] == '.nii.gz' and dj['name'] == DEMO_DATASET_NAME
    assert len(os.listdir(os.path.join(built, 'imagesTr'))) == n
    assert len(os.listdir(os.path.join(built, 'labelsTr'))) == n
    fed = Federation.from_folder(built)
    assert fed.site_names == [s.name for s in TEST_SITES]
    for s in TEST_SITES:
        assert fed.sites[s.name].cases == tuple(f'{s.name}_{i:03d}' for i in range(s.n_cases))


def test_geometry_per_site(built):
    shapes = {}
    for site in TEST_SITES:
        spacing_xyz = site_spacing_mm(site, SIZE)
        shape_xyz = site_shape(site, SIZE)
        shapes[site.name] = shape_xyz
        for case in site.case_ids():
            image_file, label_file = _files(built, case)
            img, ip = _read(image_file)
            seg, sp = _read(label_file)
            # nnU-Net arrays and spacings are z, y, x
            assert img.shape == (1,) + shape_xyz[::-1] == seg.shape
            np.testing.assert_allclose(ip['spacing'], spacing_xyz[::-1], rtol=1e-6)
            for key in ('spacing', 'origin', 'direction'):
                np.testing.assert_allclose(ip['sitk_stuff'][key], sp['sitk_stuff'][key], atol=1e-5)
            np.testing.assert_allclose(ip['spacing'], sp['spacing'])
    base = site_spacing_mm(TEST_SITES[0], SIZE)
    assert max(shapes['A']) == SIZE and base[0] == base[1] == base[2]
    # the thick-slice site has fewer slices along z, the same in-plane grid
    assert TEST_SITES[1].spacing[2] > 1 and shapes['B'][2] < shapes['A'][2] and shapes['B'][:2] == shapes['A'][:2]


def test_labels_and_background(built):
    import SimpleITK as sitk
    for site in TEST_SITES:
        for case in site.case_ids():
            image_file, label_file = _files(built, case)
            img = sitk.GetArrayFromImage(sitk.ReadImage(image_file))
            seg = sitk.GetArrayFromImage(sitk.ReadImage(label_file))
            assert img.dtype == np.float32 and seg.dtype == np.uint8
            assert set(np.unique(seg).tolist()) == {0, 1, 2}, case
            assert np.all(img >= 0) and np.all(img[seg > 0] > 0)
            zero = img == 0
            assert 0.3 < zero.mean() < 0.95, case  # skull-stripped: exactly 0 outside the brain
            border = np.concatenate([zero[[0, -1]].ravel(), zero[:, [0, -1]].ravel(), zero[:, :, [0, -1]].ravel()])
            assert border.mean() > 0.9, case  # the brain is inside the field of view


def test_determinism_and_site_independence(built, tmp_path):
    import SimpleITK as sitk
    # same seed, a different set of sites: the remaining sites' cases are byte-identical
    other = build_demo_federation(raw_root=str(tmp_path), size=SIZE, seed=0, sites=(TEST_SITES[2], TEST_SITES[0]),
                                  verbose=False)
    for site in (TEST_SITES[0], TEST_SITES[2]):
        for case in site.case_ids():
            for a, b in zip(_files(built, case), _files(other, case)):
                assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(a)),
                                      sitk.GetArrayFromImage(sitk.ReadImage(b))), case
    assert not os.path.exists(os.path.join(other, 'labelsTr', 'B_000.nii.gz'))
    # in memory: same (seed, site, index) -> identical, another seed or index -> another subject
    site = TEST_SITES[0]
    img0, seg0, _ = generate_case(site, 0, SIZE, seed=0)
    img0b, seg0b, _ = generate_case(site, 0, SIZE, seed=0)
    assert np.array_equal(img0, img0b) and np.array_equal(seg0, seg0b)
    img1, seg1, _ = generate_case(site, 0, SIZE, seed=1)
    assert not np.array_equal(seg0, seg1) and not np.array_equal(img0, img1)
    assert not np.array_equal(seg0, generate_case(site, 1, SIZE, seed=0)[1])


def test_verify_dataset_integrity(built, monkeypatch, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    monkeypatch.setenv('nnUNet_raw', os.path.dirname(built))
    point_nnunet_folder(monkeypatch, 'nnUNet_preprocessed', tmp_path / 'pre')
    point_nnunet_folder(monkeypatch, 'nnUNet_results', tmp_path / 'res')
    verify_dataset_integrity(built, 1)


def test_overwrite_and_interrupted_build(tmp_path, monkeypatch):
    small = (TEST_SITES[0],)
    folder = build_demo_federation(raw_root=str(tmp_path), size=16, sites=small, verbose=False)
    with pytest.raises(FileExistsError, match='overwrite=True'):
        build_demo_federation(raw_root=str(tmp_path), size=16, sites=small, verbose=False)
    # another dataset with the same id would make nnU-Net's id lookup ambiguous
    with pytest.raises(FileExistsError, match='unique'):
        build_demo_federation(raw_root=str(tmp_path), name='Other', size=16, sites=small, verbose=False)
    # $nnUNet_raw is the default root
    point_nnunet_folder(monkeypatch, 'nnUNet_raw', tmp_path)
    again = build_demo_federation(size=16, seed=3, sites=small, overwrite=True, verbose=False)
    assert again == folder
    assert json.load(open(os.path.join(folder, 'dataset.json')))['description'].endswith('seed=3.')
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(folder)]

    # an interrupted build leaves the old folder as it was and no temporary folder behind
    calls = []

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = demo.generate_case
    calls.clear()
    monkeypatch.setattr(demo, 'generate_case', fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        build_demo_federation(size=16, seed=4, sites=small, overwrite=True, verbose=False)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(folder)]
    assert json.load(open(os.path.join(folder, 'dataset.json')))['description'].endswith('seed=3.')
    other_root = tmp_path / 'fresh'
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        build_demo_federation(raw_root=str(other_root), size=16, sites=small, verbose=False)
    assert os.listdir(other_root) == []


def test_one_hospitals_own_folder_holds_its_cases_of_the_whole_demo(built, tmp_path, monkeypatch):
    """fednnunet_demo_data --site B: what hospital B has on its own machine in a deployment try-out."""
    from fednnunet.cli import demo_data_entry
    monkeypatch.setenv('nnUNet_raw', str(tmp_path / 'hospital_B'))
    demo_data_entry(['--test-sites', '--size', str(SIZE), '--site', 'B'])
    own = str(tmp_path / 'hospital_B' / os.path.basename(built))
    cases = list(TEST_SITES[1].case_ids())
    assert json.load(open(os.path.join(own, 'sites.json'))) == {'sites': {'B': {'cases': cases}}}
    assert json.load(open(os.path.join(own, 'dataset.json'))) == json.load(open(os.path.join(built, 'dataset.json')))
    assert sorted(os.listdir(os.path.join(own, 'labelsTr'))) == sorted(f'{c}.nii.gz' for c in TEST_SITES[1].case_ids())
    for case in TEST_SITES[1].case_ids():
        for mine, pooled in zip(_files(own, case), _files(built, case)):
            np.testing.assert_array_equal(_read(mine)[0], _read(pooled)[0])
    assert set(Federation.from_folder(own).sites) == {'B'}
    with pytest.raises(ValueError, match="site 'Z' is not one of the demo's sites"):
        build_demo_federation(raw_root=str(tmp_path / 'z'), size=SIZE, sites=TEST_SITES, verbose=False, only_site='Z')


def test_the_lesion_demo_adds_a_small_class_and_leaves_the_rest_of_every_case_as_it_was(tmp_path, monkeypatch):
    """fednnunet_demo_data --lesion: label 3, small, hypointense, inside the white matter's neighbourhood; tissue,
    transform and scanner of each case are those of the plain demo (the lesion has its own random stream)."""
    from fednnunet.cli import demo_data_entry
    size = 48
    monkeypatch.setenv('nnUNet_raw', str(tmp_path))
    demo_data_entry(['--test-sites', '--size', str(size), '--lesion'])
    folder = tmp_path / f'Dataset{demo.LESION_DATASET_ID}_{demo.LESION_DATASET_NAME}'
    dj = json.load(open(folder / 'dataset.json'))
    assert dj['labels'] == {'background': 0, 'grey_matter': 1, 'white_matter': 2, 'lesion': 3}
    assert 'lesion' in dj['description']
    Federation.from_folder(str(folder))
    for site in TEST_SITES:
        lesions = []
        for i, case in enumerate(site.case_ids()):
            seg = _read(_files(str(folder), case)[1])[0][0]
            img = _read(_files(str(folder), case)[0])[0][0]
            plain_img, plain_seg, _ = generate_case(site, i, size, seed=0)
            plain_img, plain_seg = plain_img.transpose(2, 1, 0), plain_seg.transpose(2, 1, 0)  # files are z, y, x
            lesion = seg == demo.LESION_LABEL
            lesions.append(lesion)
            share = lesion.sum() / (seg > 0).sum()
            assert 0 < share < 0.005, (case, share)
            # outside the lesion's voxels the label is the plain demo's; the lesion replaced (mostly) white matter
            np.testing.assert_array_equal(seg[~lesion], plain_seg[~lesion])
            assert (plain_seg[lesion] == 2).mean() > 0.5, case
            # hypointense: the image is darker inside; away from it (beyond its partial-volume rim) it is the plain
            # demo's up to the noise level's tiny change (the noise scales with the mean brain signal)
            assert img[lesion].mean() < 0.8 * plain_img[lesion].mean(), case
            far = ~ndimage.binary_dilation(lesion, iterations=2)
            np.testing.assert_allclose(img[far], plain_img[far], rtol=0.01, atol=1e-3 * plain_img.max())
        # a different case of the site has its lesion elsewhere
        assert not np.array_equal(lesions[0], lesions[1]), site.name


def test_the_semi_supervised_demo_withholds_labels_and_keeps_every_image(built, tmp_path, monkeypatch, capsys):
    """fednnunet_demo_data --labelled-per-site 1: the first case of every site keeps its label; the others are the
    site's unlabelled cases, with the plain demo's images and no label anywhere."""
    from fednnunet.cli import demo_data_entry
    monkeypatch.setenv('nnUNet_raw', str(tmp_path / 'raw'))
    demo_data_entry(['--test-sites', '--size', str(SIZE), '--labelled-per-site', '1'])
    folder = str(tmp_path / 'raw' / demo.dataset_folder_name(demo.SEMI_SUPERVISED_DATASET_ID,
                                                             demo.SEMI_SUPERVISED_DATASET_NAME))
    spec = json.load(open(os.path.join(folder, 'sites.json')))['sites']
    for site in TEST_SITES:
        cases = list(site.case_ids())
        assert spec[site.name] == {'cases': cases[:1], 'unlabelled': cases[1:]}
        for case in cases[1:]:
            image = os.path.join(folder, 'imagesTrUnlabelled', f'{case}_0000.nii.gz')
            np.testing.assert_array_equal(_read(image)[0], _read(_files(built, case)[0])[0])
            assert not os.path.exists(_files(folder, case)[1]) and not os.path.exists(_files(folder, case)[0])
    assert sorted(os.listdir(os.path.join(folder, 'labelsTr'))) == sorted(
        f'{s.case_ids()[0]}.nii.gz' for s in TEST_SITES)
    assert json.load(open(os.path.join(folder, 'dataset.json')))['numTraining'] == len(TEST_SITES)
    federation = Federation.from_folder(folder)
    assert {n: len(s.unlabelled) for n, s in federation.sites.items()} == {s.name: s.n_cases - 1 for s in TEST_SITES}
    with pytest.raises(SystemExit):
        demo_data_entry(['--test-sites', '--size', str(SIZE), '--labelled-per-site', '1', '--lesion'])
    assert 'are different demos' in capsys.readouterr().err


def test_the_public_set_demo_gives_the_server_labels_and_most_sites_none(built, tmp_path, monkeypatch):
    """fednnunet_demo_data --public-set: the first site keeps one labelled training case, every site one labelled
    validation-only case, everything else unlabelled (the plain demo's images); the server holds a labelled public
    set from a scanner no site has; every participant names its network."""
    from fednnunet.cli import demo_data_entry
    monkeypatch.setenv('nnUNet_raw', str(tmp_path / 'raw'))
    demo_data_entry(['--test-sites', '--size', str(SIZE), '--public-set'])
    folder = str(tmp_path / 'raw' / demo.dataset_folder_name(demo.PUBLIC_SET_DATASET_ID, demo.PUBLIC_SET_DATASET_NAME))
    spec = json.load(open(os.path.join(folder, 'sites.json')))
    for i, site in enumerate(TEST_SITES):
        cases = list(site.case_ids())
        labelled = cases[:1] if i == 0 else []
        assert spec['sites'][site.name] == {'cases': labelled, 'unlabelled': cases[len(labelled):-1],
                                            'validation': cases[-1:], 'network': 'plain'}, site.name
        for case in cases[len(labelled):-1]:
            image = os.path.join(folder, 'imagesTrUnlabelled', f'{case}_0000.nii.gz')
            np.testing.assert_array_equal(_read(image)[0], _read(_files(built, case)[0])[0])
            assert not os.path.exists(_files(folder, case)[1])
        for case in labelled + cases[-1:]:
            np.testing.assert_array_equal(_read(_files(folder, case)[1])[0], _read(_files(built, case)[1])[0])
    public = list(demo.TEST_PUBLIC_SCANNER.case_ids())
    assert spec['server'] == {'cases': public, 'network': 'resenc_wide'}
    federation = Federation.from_folder(folder)
    assert federation.server is not None and federation.server.cases == tuple(public)
    assert not federation.sites['B'].cases and federation.sites['B'].validation == ('B_001',)
    # the public scanner differs from every site's: its intensities are not any site's
    image = _read(_files(folder, public[0])[0])[0]
    brain = image > 0
    for site in TEST_SITES:
        other = _read(_files(folder, site.case_ids()[-1])[0])[0]
        assert abs(np.median(image[brain]) - np.median(other[other > 0])) > 0.05 * np.median(other[other > 0])
    assert json.load(open(os.path.join(folder, 'dataset.json')))['numTraining'] == 1 + len(TEST_SITES) + len(public)


def test_the_multimodal_demo_gives_each_site_its_contrasts_a_flair_lesion_and_its_own_drift(tmp_path, monkeypatch):
    """fednnunet_demo_data --multimodal: dataset.json's three contrasts, each site's training images of its own
    contrasts only (sites.json 'channels'), held-out test cases with every contrast; the lesion is clearly visible in
    FLAIR and faint in T1 and T2; the contrasts' drift differs between sites; a site's cases do not depend on which
    contrasts it keeps; --site writes one hospital's part."""
    from fednnunet import demo_multimodal as mm
    from fednnunet.cli import demo_data_entry
    monkeypatch.setenv('nnUNet_raw', str(tmp_path / 'raw'))
    demo_data_entry(['--test-sites', '--size', str(SIZE), '--multimodal'])
    folder = str(tmp_path / 'raw' / demo.dataset_folder_name(mm.MULTIMODAL_DATASET_ID, mm.MULTIMODAL_DATASET_NAME))
    dj = json.load(open(os.path.join(folder, 'dataset.json')))
    assert dj['channel_names'] == {'0': 'T1', '1': 'T2', '2': 'FLAIR'}
    assert dj['labels'] == {'background': 0, 'grey_matter': 1, 'white_matter': 2, 'lesion': 3}
    spec = json.load(open(os.path.join(folder, 'sites.json')))
    federation = Federation.from_folder(folder)
    for site in mm.TEST_MULTIMODAL_SITES:
        assert spec['sites'][site.name] == {'cases': list(site.case_ids()), 'channels': list(site.channels)}
        codes = {f'{mm.MODALITIES.index(m):04d}' for m in site.channels}
        for case in site.case_ids():
            assert {f[len(case) + 1:-7] for f in os.listdir(os.path.join(folder, 'imagesTr'))
                    if f.startswith(case + '_')} == codes
        assert mm.test_cases(folder, site.name) == list(site.test_case_ids(1))
        assert len(federation.sites[site.name].present_channels) == len(site.channels)
    for (test,) in [mm.TEST_MULTIMODAL_SITES[0].test_case_ids(1)]:
        assert sorted(f for f in os.listdir(os.path.join(folder, 'imagesTs')) if f.startswith(test)) == [
            f'{test}_{c:04d}.nii.gz' for c in range(3)]

    ratios = {}  # (site, modality): lesion / white matter signal, over a site's case
    for site in mm.TEST_MULTIMODAL_SITES:
        images, label, _ = mm.generate_multimodal_case(site, 0, SIZE, 0)
        lesion, wm = label == demo.LESION_LABEL, label == 2
        assert lesion.sum() > 0
        for m, image in images.items():
            ratios[site.name, m] = image[lesion].mean() / image[wm].mean()
        # the written training images are the generated ones (the site's contrasts only)
        for m in site.channels:
            written = _read(os.path.join(folder, 'imagesTr', f'{site.case_ids()[0]}_{mm.MODALITIES.index(m):04d}'
                                                              f'.nii.gz'))[0][0]
            np.testing.assert_allclose(written, images[m].transpose(2, 1, 0))
        # a site that kept other contrasts would have the very same images of this subject
        other = dataclasses.replace(site, channels=('T1',))
        again, _, _ = mm.generate_multimodal_case(other, 0, SIZE, 0)
        assert all(np.array_equal(again[m], images[m]) for m in mm.MODALITIES)
    for site in mm.TEST_MULTIMODAL_SITES:
        assert ratios[site.name, 'FLAIR'] > 1.3, ratios
        assert 0.9 < ratios[site.name, 'T1'] < 1.1 and 0.9 < ratios[site.name, 'T2'] < 1.1, ratios
    # per-site drift: B's T2 (scale 1.6x, gamma 1.3x of its scanner's) against the same subject without the drift
    b = mm.TEST_MULTIMODAL_SITES[1]
    for drifted, plain in [(mm.generate_multimodal_case(b, 0, SIZE, 0),
                            mm.generate_multimodal_case(dataclasses.replace(b, drift=((1.0, 1.0),) * 3), 0, SIZE, 0))]:
        label = drifted[1]
        grey_white = [images['T2'][label == 1].mean() / images['T2'][label == 2].mean()
                      for images in (drifted[0], plain[0])]
        assert grey_white[0] > grey_white[1] * 1.05, grey_white
        assert drifted[0]['T2'][label > 0].mean() > 1.3 * plain[0]['T2'][label > 0].mean()
        assert np.array_equal(drifted[0]['T1'], plain[0]['T1'])  # T1's drift is 1 at B

    monkeypatch.setenv('nnUNet_raw', str(tmp_path / 'hospital_C'))
    demo_data_entry(['--test-sites', '--size', str(SIZE), '--multimodal', '--site', 'C'])
    own = str(tmp_path / 'hospital_C' / os.path.basename(folder))
    assert set(json.load(open(os.path.join(own, 'sites.json')))['sites']) == {'C'}
    assert {f.split('_')[0] for sub in ('imagesTr', 'imagesTs') for f in os.listdir(os.path.join(own, sub))} == {'C'}
    assert json.load(open(os.path.join(own, 'dataset.json'))) == dj
