"""Bad federation input: a clear error naming site, case and field, and no server output that looks done."""
import json
import os
import shutil

import pytest
import SimpleITK as sitk

from fednnunet.cli import plan_and_preprocess_entry
from fednnunet.engines.simulation import SimulationEngine
from fednnunet.errors import FederationError
from fednnunet.federation import Federation, server_folder
from fednnunet.plan_and_preprocess import plan_and_preprocess

from conftest import DATASET_NAME


def _sites(raw):
    with open(raw / 'sites.json') as f:
        return json.load(f)


def _write_sites(raw, spec):
    with open(raw / 'sites.json', 'w') as f:
        json.dump(spec, f)


def _run(raw):
    fed = Federation.from_folder(str(raw))
    return plan_and_preprocess(SimulationEngine.for_federation(fed), DATASET_NAME, ['3d_fullres'], 'nnUNetPlannerCPU')


def _assert_nothing_on_server():
    folder = server_folder(DATASET_NAME)
    written = os.listdir(folder) if os.path.isdir(folder) else []
    assert [f for f in written if f != 'sites'] == [], written


def _separate_site(raw, tmp_path, site, edit_dataset_json):
    """Gives `site` its own raw folder (as on its own machine) with an edited dataset.json."""
    spec = _sites(raw)
    own = tmp_path / f'own_{site}' / DATASET_NAME
    shutil.copytree(raw, own)
    with open(own / 'dataset.json') as f:
        dj = json.load(f)
    edit_dataset_json(dj)
    with open(own / 'dataset.json', 'w') as f:
        json.dump(dj, f)
    spec['sites'][site]['raw_folder'] = str(own)
    _write_sites(raw, spec)


def test_label_value_not_declared(raw_copy):
    f = raw_copy / 'labelsTr' / 'C_000.nii.gz'
    img = sitk.ReadImage(str(f))
    arr = sitk.GetArrayFromImage(img)
    arr[arr.shape[0] // 2, arr.shape[1] // 2, arr.shape[2] // 2] = 3
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(f))
    with pytest.raises(FederationError, match=r"site 'C', case 'C_000', field 'labels'.*\[3\.0\]") as e:
        _run(raw_copy)
    assert (e.value.site, e.value.case, e.value.field) == ('C', 'C_000', 'labels')
    _assert_nothing_on_server()


def test_sites_disagree_on_labels(raw_copy, tmp_path):
    _separate_site(raw_copy, tmp_path, 'B', lambda dj: dj['labels'].update({'csf': 3}))
    with pytest.raises(FederationError, match=r"site 'B', field 'labels'.*differs from site 'A'"):
        _run(raw_copy)
    _assert_nothing_on_server()


def test_sites_disagree_on_channel_names(raw_copy, tmp_path):
    _separate_site(raw_copy, tmp_path, 'C', lambda dj: dj.update({'channel_names': {'0': 'T2'}}))
    with pytest.raises(FederationError, match=r"site 'C', field 'channel_names'"):
        _run(raw_copy)
    _assert_nothing_on_server()


def test_site_declares_other_channels(raw_copy):
    spec = _sites(raw_copy)
    spec['sites']['A']['channels'] = ['T1', 'FLAIR']
    _write_sites(raw_copy, spec)
    with pytest.raises(FederationError, match=r"site 'A', field 'channels'"):
        _run(raw_copy)
    _assert_nothing_on_server()


def test_missing_channel_file(raw_copy, tmp_path):
    _separate_site(raw_copy, tmp_path, 'B', lambda dj: dj.update({'channel_names': {'0': 'T1', '1': 'T2'}}))
    with pytest.raises(FederationError, match=r"site 'B', case 'B_000', field 'channel 1 \(T2\)'.*missing"):
        _run(raw_copy)


def test_case_assigned_to_two_sites(raw_copy):
    spec = _sites(raw_copy)
    spec['sites']['B']['cases'].append('A_001')
    _write_sites(raw_copy, spec)
    with pytest.raises(FederationError, match=r"case 'A_001', field 'sites.json'.*two sites: 'A' and 'B'"):
        Federation.from_folder(str(raw_copy))


def test_case_assigned_to_no_site(raw_copy):
    spec = _sites(raw_copy)
    spec['sites']['A']['cases'].remove('A_002')
    _write_sites(raw_copy, spec)
    with pytest.raises(FederationError, match=r"case 'A_002', field 'sites.json'.*assigned to no site"):
        Federation.from_folder(str(raw_copy))


def test_site_with_zero_cases(raw_copy):
    spec = _sites(raw_copy)
    spec['sites']['D'] = {'cases': []}
    _write_sites(raw_copy, spec)
    with pytest.raises(FederationError, match=r"site 'D', field 'cases'.*no training case"):
        Federation.from_folder(str(raw_copy))


def test_unreadable_image(raw_copy):
    (raw_copy / 'imagesTr' / 'C_001_0000.nii.gz').write_bytes(b'this is not a nifti file')
    with pytest.raises(FederationError, match=r"site 'C', case 'C_001', field 'channel 0'.*cannot read") as e:
        _run(raw_copy)
    assert 'C_001_0000.nii.gz' in str(e.value)
    _assert_nothing_on_server()


def test_unreadable_first_image_fails_at_describe(raw_copy):
    (raw_copy / 'imagesTr' / 'B_000_0000.nii.gz').write_bytes(b'garbage')
    with pytest.raises(FederationError, match=r"site 'B', case 'B_000', field 'images'.*no nnU-Net reader"):
        _run(raw_copy)
    _assert_nothing_on_server()


def test_label_shape_differs_from_image(raw_copy):
    f = raw_copy / 'labelsTr' / 'A_001.nii.gz'
    img = sitk.ReadImage(str(f))
    arr = sitk.GetArrayFromImage(img)[:-2]
    out = sitk.GetImageFromArray(arr)
    out.SetSpacing(img.GetSpacing())
    out.SetOrigin(img.GetOrigin())
    sitk.WriteImage(out, str(f))
    with pytest.raises(FederationError, match=r"site 'A', case 'A_001', field 'label'.*shape"):
        _run(raw_copy)
    _assert_nothing_on_server()


def test_malformed_sites_json(raw_copy):
    (raw_copy / 'sites.json').write_text('{"sites": {"A": {"cases": "A_000"}}}')
    with pytest.raises(FederationError, match=r"site 'A', field 'cases'"):
        Federation.from_folder(str(raw_copy))
    (raw_copy / 'sites.json').write_text('not json')
    with pytest.raises(FederationError, match='not valid JSON'):
        Federation.from_folder(str(raw_copy))
    os.remove(raw_copy / 'sites.json')
    with pytest.raises(FederationError, match='sites.json is missing'):
        Federation.from_folder(str(raw_copy))


def test_cli_reports_wrong_ids_and_sites(raw_copy, capsys):
    with pytest.raises(SystemExit) as e:
        plan_and_preprocess_entry(['-d', '999', '-np', '1'])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("fednnunet: error: field 'dataset id': dataset '999' was not found")
    with pytest.raises(SystemExit) as e:
        plan_and_preprocess_entry(['-d', '501', '--sites', 'A', 'Z', '-np', '1'])
    assert e.value.code == 2
    assert "fednnunet: error: field '--sites': unknown site(s) ['Z']; sites.json has ['A', 'B', 'C']" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # checked while parsing: nothing is fingerprinted or written
        plan_and_preprocess_entry(['-d', '501', '-np', '0'])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ('fednnunet: error: fednnunet_plan_and_preprocess: argument -np: must be '
                                               'an integer >= 1, got 0 (see fednnunet_plan_and_preprocess --help)')
    _assert_nothing_on_server()


def _assert_nothing_at_the_sites():
    """A failed planning leaves no fingerprint and no private intensity sample at any site (only the ledger that
    counts the plannings a site answered, which holds a number)."""
    from fednnunet.fingerprint import LEDGER_FILE
    sites = os.path.join(server_folder(DATASET_NAME), 'sites')
    left = [os.path.join(root, f) for root, _, files in os.walk(sites) for f in files
            if f != LEDGER_FILE] if os.path.isdir(sites) else []
    assert left == [], left
    assert not any(os.path.isdir(os.path.join(sites, s, 'private')) for s in os.listdir(sites)) \
        if os.path.isdir(sites) else True


def test_truncated_image_is_refused_by_name(raw_copy):
    """SimpleITK reads a half-copied .nii.gz without an error, filling the rest with zeros (the fingerprint's
    minimum would become 0 and the plans change): the site refuses it, naming site, case and channel."""
    f = raw_copy / 'imagesTr' / 'B_001_0000.nii.gz'
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(f))).size > 0  # SimpleITK itself does not complain
    with pytest.raises(FederationError, match=r"site 'B', case 'B_001', field 'channel 0'.*B_001_0000.nii.gz.*"
                                              r"truncated") as e:
        _run(raw_copy)
    assert (e.value.site, e.value.case) == ('B', 'B_001')
    _assert_nothing_on_server()
    _assert_nothing_at_the_sites()


def test_truncated_uncompressed_label_is_refused_by_name(raw_copy):
    spec = _sites(raw_copy)
    f = raw_copy / 'labelsTr' / 'A_001.nii.gz'
    img = sitk.ReadImage(str(f))
    os.remove(f)
    # the case with a .nii label of half its size (dataset.json's explicit 'dataset' entry names the files)
    sitk.WriteImage(img, str(raw_copy / 'labelsTr' / 'A_001.nii'))
    half = (raw_copy / 'labelsTr' / 'A_001.nii').read_bytes()
    (raw_copy / 'labelsTr' / 'A_001.nii').write_bytes(half[:len(half) - 1000])
    with open(raw_copy / 'dataset.json') as fh:
        dj = json.load(fh)
    dj['dataset'] = {c: {'images': [f'imagesTr/{c}_0000.nii.gz'], 'label': f'labelsTr/{c}.nii.gz'}
                     for s in spec['sites'].values() for c in s['cases']}
    dj['dataset']['A_001']['label'] = 'labelsTr/A_001.nii'
    with open(raw_copy / 'dataset.json', 'w') as fh:
        json.dump(dj, fh)
    with pytest.raises(FederationError, match=r"site 'A', case 'A_001', field 'label'.*A_001.nii: it is truncated: "
                                              r"it holds \d+ bytes, its NIfTI header declares \d+"):
        _run(raw_copy)
    _assert_nothing_at_the_sites()


def test_vector_image_is_named_as_such(raw_copy):
    f = raw_copy / 'imagesTr' / 'C_000_0000.nii.gz'
    img = sitk.ReadImage(str(f))
    sitk.WriteImage(sitk.Compose(img, img), str(f))  # two components per voxel in one file
    with pytest.raises(FederationError, match=r"site 'C', case 'C_000', field 'channel 0'.*holds 2 components per "
                                              r"voxel") as e:
        _run(raw_copy)
    assert 'channels' not in str(e.value).split('holds')[0]  # not the old "has 49 channels" (the z size)
    _assert_nothing_on_server()
    _assert_nothing_at_the_sites()


def test_a_site_failing_after_others_fingerprinted_leaves_nothing_anywhere(raw_copy):
    """Site C's label holds an undeclared value: A and B have fingerprinted by then (their sample and fingerprint
    were written); the failed planning removes them."""
    f = raw_copy / 'labelsTr' / 'C_001.nii.gz'
    img = sitk.ReadImage(str(f))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = 7
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(f))
    with pytest.raises(FederationError, match=r"site 'C', case 'C_001', field 'labels'"):
        _run(raw_copy)
    _assert_nothing_on_server()
    _assert_nothing_at_the_sites()
