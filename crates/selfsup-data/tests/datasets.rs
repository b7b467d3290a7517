//! CIFAR-10 reader, image folders and the loader, on data the tests make themselves.

use std::sync::Arc;

use selfsup_data::{
    cifar, folder, preset_views, preset_views_multicrop, Dataset, Loader, LoaderConfig, LocalCrops,
    Normalize, Preset,
};

fn write_fake_cifar(dir: &std::path::Path, per_file: usize) -> (Vec<u8>, Vec<u8>) {
    let b = dir.join(cifar::BATCHES_DIR);
    std::fs::create_dir_all(&b).unwrap();
    let mut all_px = Vec::new();
    let mut all_lb = Vec::new();
    for (fi, f) in cifar::TRAIN_FILES
        .iter()
        .chain([cifar::TEST_FILE].iter())
        .enumerate()
    {
        let labels: Vec<u8> = (0..per_file).map(|i| ((i + fi) % 10) as u8).collect();
        let px: Vec<u8> = (0..per_file * 3072)
            .map(|i| ((i * 7 + fi * 13) % 256) as u8)
            .collect();
        cifar::write_batch(&b.join(f), &px, &labels).unwrap();
        if fi < 5 {
            all_px.extend_from_slice(&px);
            all_lb.extend_from_slice(&labels);
        }
    }
    std::fs::write(b.join(cifar::META_FILE), cifar::CLASSES.join("\n") + "\n").unwrap();
    (all_px, all_lb)
}

#[test]
fn cifar_reads_records_in_order() {
    let d = tempfile::tempdir().unwrap();
    let (px, lb) = write_fake_cifar(d.path(), 7);
    let train = cifar::load(d.path(), cifar::Split::Train).unwrap();
    assert_eq!(train.len(), 35);
    assert_eq!(train.classes().unwrap()[3], "cat");
    let it = train.get(9).unwrap();
    assert_eq!(it.label, Some(lb[9] as usize));
    assert_eq!(it.image.data, &px[9 * 3072..10 * 3072]);
    assert_eq!(
        (it.image.channels, it.image.height, it.image.width),
        (3, 32, 32)
    );
    let test = cifar::load(d.path(), cifar::Split::Test).unwrap();
    assert_eq!(test.len(), 7);
    assert!(train.get(35).is_err());
}

#[test]
fn cifar_errors_name_file_and_offset() {
    let d = tempfile::tempdir().unwrap();
    write_fake_cifar(d.path(), 3);
    let b = d.path().join(cifar::BATCHES_DIR);
    // Truncated file.
    let f = b.join("data_batch_2.bin");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 5]).unwrap();
    let e = cifar::load(d.path(), cifar::Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("data_batch_2.bin") && e.contains("not a multiple"),
        "{e}"
    );
    // Label out of range in record 2.
    let mut bytes = bytes;
    bytes[2 * cifar::RECORD_LEN] = 11;
    std::fs::write(&f, &bytes).unwrap();
    let e = cifar::load(d.path(), cifar::Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("data_batch_2.bin") && e.contains("label 11") && e.contains("offset 6146"),
        "{e}"
    );
    // Missing file.
    std::fs::remove_file(b.join(cifar::TEST_FILE)).unwrap();
    let e = cifar::load(d.path(), cifar::Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("test_batch.bin") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn image_folder_labelled_and_flat() {
    let d = tempfile::tempdir().unwrap();
    for (ci, class) in ["dogs", "cats"].iter().enumerate() {
        let cd = d.path().join(class);
        std::fs::create_dir_all(&cd).unwrap();
        for i in 0..3 {
            // Non-square images of another size: resized on the shorter side, centre-cropped.
            let img = image::RgbImage::from_fn(40 + i * 3, 24, |x, _| {
                image::Rgb([(x * 5) as u8, 100 * ci as u8, 7])
            });
            img.save(cd.join(format!("{i}.png"))).unwrap();
        }
    }
    std::fs::write(d.path().join("cats/broken.jpg"), b"not a jpeg").unwrap();
    let opts = folder::FolderOptions {
        size: 16,
        labelled: true,
        skip_bad: false,
    };
    let e = folder::load(d.path(), &opts).unwrap_err().to_string();
    assert!(e.contains("broken.jpg"), "{e}");
    let f = folder::load(
        d.path(),
        &folder::FolderOptions {
            skip_bad: true,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(f.skipped.len(), 1);
    assert_eq!(f.data.len(), 6);
    assert_eq!(f.data.classes().unwrap(), ["cats", "dogs"]);
    let it = f.data.get(0).unwrap();
    assert_eq!(it.label, Some(0));
    assert_eq!((it.image.height, it.image.width), (16, 16));
    assert_eq!(it.image.plane(1)[0], 100); // cats are class index 1 in creation order -> green 100
    assert_eq!(f.data.get(5).unwrap().label, Some(1));
    // Flat, unlabelled.
    let flat = folder::load(
        &d.path().join("dogs"),
        &folder::FolderOptions {
            size: 8,
            labelled: false,
            skip_bad: false,
        },
    )
    .unwrap();
    assert_eq!(flat.data.len(), 3);
    assert!(flat.data.get(0).unwrap().label.is_none());
}

fn batches(threads: usize, seed: u64) -> Vec<Vec<u8>> {
    let d = tempfile::tempdir().unwrap();
    write_fake_cifar(d.path(), 20);
    let ds = Arc::new(cifar::load(d.path(), cifar::Split::Train).unwrap());
    let cfg = LoaderConfig {
        batch_size: 16,
        seed,
        threads,
        ..Default::default()
    };
    let l = Loader::new(
        ds,
        preset_views(Preset::SimclrImagenet, 32, Normalize::cifar10()),
        cfg,
    )
    .unwrap();
    assert_eq!(l.num_batches(), 6);
    let mut out = Vec::new();
    for epoch in 0..2 {
        for b in l.epoch(epoch) {
            let b = b.unwrap();
            assert_eq!(b.views.len(), 2);
            assert_eq!(b.views[0].dims(), &[16, 3, 32, 32]);
            assert_eq!(b.labels.as_ref().unwrap().dims(), &[16]);
            for v in &b.views {
                let x: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
                out.push(x.iter().flat_map(|f| f.to_le_bytes()).collect());
            }
        }
    }
    out
}

#[test]
fn loader_is_byte_identical_across_thread_counts() {
    let one = batches(1, 5);
    let four = batches(4, 5);
    assert_eq!(one.len(), 24);
    assert!(one == four, "batches differ between 1 and 4 threads");
    let other = batches(2, 6);
    assert!(one != other, "another seed must give other batches");
    // Two views of one image differ (independent augmentations), and epochs differ.
    assert_ne!(one[0], one[1]);
    assert_ne!(one[0], one[12]);
}

#[test]
fn loader_eval_mode_is_plain_normalisation() {
    let d = tempfile::tempdir().unwrap();
    write_fake_cifar(d.path(), 5);
    let ds = Arc::new(cifar::load(d.path(), cifar::Split::Test).unwrap());
    let cfg = LoaderConfig {
        batch_size: 4,
        shuffle: false,
        drop_last: false,
        ..Default::default()
    };
    let l = Loader::new(
        ds.clone(),
        preset_views(Preset::None, 32, Normalize::cifar10()),
        cfg,
    )
    .unwrap();
    let all: Vec<_> = l.epoch(0).map(|b| b.unwrap()).collect();
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].views[0].dims(), &[1, 3, 32, 32]);
    assert_eq!(all[1].indices, vec![4]);
    let want = Normalize::cifar10().apply(&ds.get(4).unwrap().image);
    let got: Vec<f32> = all[1].views[0].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got, want);
    // Bad configuration is an error, not a panic.
    let bad = LoaderConfig {
        batch_size: 0,
        ..Default::default()
    };
    assert!(Loader::new(
        ds,
        preset_views(Preset::None, 32, Normalize::cifar10()),
        bad
    )
    .is_err());
}

/// A dataset whose item 5 panics (a bug or a bad file in a reader).
struct PanicsAt5(selfsup_data::InMemory);

impl selfsup_data::Dataset for PanicsAt5 {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&self, i: usize) -> selfsup_data::Result<selfsup_data::Item> {
        assert!(i != 5, "item 5 cannot be read");
        self.0.get(i)
    }
}

#[test]
fn a_loader_thread_that_dies_fails_the_epoch_instead_of_ending_it() {
    let ds = std::sync::Arc::new(PanicsAt5(selfsup_data::synthetic::stripes(20, 8, 2, 1)));
    let views = selfsup_data::preset_views(
        selfsup_data::Preset::None,
        8,
        selfsup_data::Normalize {
            mean: [0.5; 3],
            std: [0.25; 3],
        },
    );
    let loader = selfsup_data::Loader::new(
        ds,
        views,
        selfsup_data::LoaderConfig {
            batch_size: 4,
            shuffle: false,
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let out: Vec<_> = loader.epoch(0).collect();
    // Batch 0 (items 0-3) arrives; batch 1 holds item 5, its thread panics: an error, not a
    // silently short epoch.
    assert!(out[0].is_ok());
    let err = out.iter().find_map(|b| b.as_ref().err()).expect("an error");
    assert!(err.to_string().contains("prefetch thread stopped"), "{err}");
}

#[test]
fn local_crops_come_after_the_global_views_at_their_own_size() {
    let d = tempfile::tempdir().unwrap();
    write_fake_cifar(d.path(), 20);
    let ds = Arc::new(cifar::load(d.path(), cifar::Split::Train).unwrap());
    let local = LocalCrops {
        count: 3,
        size: 16,
        scale: (0.1, 0.4),
    };
    let views = preset_views_multicrop(
        Preset::SimclrCifar,
        32,
        0.08,
        1.0,
        &local,
        Normalize::cifar10(),
    )
    .unwrap();
    assert_eq!(views.len(), 5);
    let cfg = LoaderConfig {
        batch_size: 8,
        threads: 2,
        ..Default::default()
    };
    let l = Loader::new(ds.clone(), views.clone(), cfg.clone()).unwrap();
    let b = l.epoch(0).next().unwrap().unwrap();
    let dims: Vec<Vec<usize>> = b.views.iter().map(|v| v.dims().to_vec()).collect();
    assert_eq!(dims[..2], [vec![8, 3, 32, 32], vec![8, 3, 32, 32]]);
    assert!(dims[2..].iter().all(|d| d == &[8, 3, 16, 16]), "{dims:?}");
    // Each local view is drawn with its own randomness, and the same seed gives the same views.
    let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_ne!(flat(&b.views[2]), flat(&b.views[3]));
    let again = Loader::new(ds, views, cfg)
        .unwrap()
        .epoch(0)
        .next()
        .unwrap()
        .unwrap();
    for (x, y) in b.views.iter().zip(&again.views) {
        assert_eq!(flat(x), flat(y));
    }
    // No local views: the preset's views unchanged.
    let none = LocalCrops {
        count: 0,
        ..local.clone()
    };
    assert_eq!(
        preset_views_multicrop(
            Preset::SimclrCifar,
            32,
            0.08,
            1.0,
            &none,
            Normalize::cifar10()
        )
        .unwrap()
        .len(),
        2
    );
    // Bad settings and one-view presets are refused with what is wrong.
    for (bad, want) in [
        (
            LocalCrops {
                scale: (0.0, 0.4),
                ..local.clone()
            },
            "scale",
        ),
        (
            LocalCrops {
                scale: (0.5, 0.4),
                ..local.clone()
            },
            "scale",
        ),
        (
            LocalCrops {
                scale: (0.1, 1.5),
                ..local.clone()
            },
            "scale",
        ),
        (
            LocalCrops {
                size: 0,
                ..local.clone()
            },
            "size",
        ),
    ] {
        let e = preset_views_multicrop(
            Preset::SimclrCifar,
            32,
            0.08,
            1.0,
            &bad,
            Normalize::cifar10(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(want), "{e}");
    }
    let e = preset_views_multicrop(
        Preset::CropFlip,
        32,
        0.08,
        1.0,
        &local,
        Normalize::cifar10(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("two-view augmentation"), "{e}");
}

/// No local crops (the settings a two-view run passes).
fn no_local_crops() -> LocalCrops {
    LocalCrops {
        count: 0,
        size: 16,
        scale: (0.1, 0.4),
    }
}

/// Every view of the first 8-image batch of `views` over `ds`, flattened.
fn first_batch_views(
    ds: &Arc<selfsup_data::InMemory>,
    views: selfsup_data::MultiView,
) -> Vec<Vec<f32>> {
    let cfg = LoaderConfig {
        batch_size: 8,
        threads: 1,
        ..Default::default()
    };
    let b = Loader::new(ds.clone(), views, cfg)
        .unwrap()
        .epoch(0)
        .next()
        .unwrap()
        .unwrap();
    b.views
        .iter()
        .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn the_global_crop_scale_is_a_setting_and_its_default_is_the_presets() {
    let d = tempfile::tempdir().unwrap();
    write_fake_cifar(d.path(), 16);
    let ds = Arc::new(cifar::load(d.path(), cifar::Split::Train).unwrap());
    let none = no_local_crops();
    let views_of = |v: selfsup_data::MultiView| first_batch_views(&ds, v);
    for preset in [Preset::SimclrCifar, Preset::SimclrImagenet, Preset::Byol] {
        let plain = views_of(preset_views(preset, 32, Normalize::cifar10()));
        let default = views_of(
            preset_views_multicrop(
                preset,
                32,
                selfsup_data::DEFAULT_MIN_SCALE,
                1.0,
                &none,
                Normalize::cifar10(),
            )
            .unwrap(),
        );
        assert_eq!(plain, default, "{preset:?}");
        let larger = views_of(
            preset_views_multicrop(preset, 32, 0.5, 1.0, &none, Normalize::cifar10()).unwrap(),
        );
        assert_ne!(plain, larger, "{preset:?}");
    }
    for bad in [0.0, -0.1, 1.5, f64::NAN] {
        let e = preset_views_multicrop(
            Preset::SimclrCifar,
            32,
            bad,
            1.0,
            &none,
            Normalize::cifar10(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("crop min scale"), "{e}");
    }
}

#[test]
fn the_jitter_scale_multiplies_the_presets_colour_jitter() {
    use selfsup_data::transforms::{
        ColorJitter, HorizontalFlip, RandomGrayscale, RandomResizedCrop,
    };
    use selfsup_data::{MultiView, Pipeline};
    let d = tempfile::tempdir().unwrap();
    write_fake_cifar(d.path(), 16);
    let ds = Arc::new(cifar::load(d.path(), cifar::Split::Train).unwrap());
    let none = no_local_crops();
    let views_of = |v: selfsup_data::MultiView| first_batch_views(&ds, v);
    let scaled = |s: f64| {
        views_of(
            preset_views_multicrop(
                Preset::SimclrCifar,
                32,
                0.35,
                s,
                &none,
                Normalize::cifar10(),
            )
            .unwrap(),
        )
    };
    // Half the strengths is SimCLR's CIFAR pipeline written out with 0.2 / 0.2 / 0.2 / 0.05.
    let by_hand = |b: f32, h: f32| {
        views_of(MultiView::repeat(
            Pipeline {
                transforms: vec![
                    Arc::new(RandomResizedCrop {
                        scale: (0.35, 1.0),
                        ..RandomResizedCrop::new(32)
                    }),
                    Arc::new(HorizontalFlip { p: 0.5 }),
                    Arc::new(ColorJitter {
                        brightness: b,
                        contrast: b,
                        saturation: b,
                        hue: h,
                        p: 0.8,
                    }),
                    Arc::new(RandomGrayscale { p: 0.2 }),
                ],
                normalize: Normalize::cifar10(),
            },
            2,
        ))
    };
    let half = scaled(0.5);
    assert_eq!(half, by_hand(0.2, 0.05));
    assert_eq!(scaled(1.0), by_hand(0.4, 0.1));
    assert_ne!(half, scaled(1.0));
    // 0 keeps the crops and flips and draws no colour change.
    assert_eq!(scaled(0.0), by_hand(0.0, 0.0));
    assert_ne!(scaled(0.0), half);
    for bad in [-0.5, 5.5, f64::NAN] {
        let e = preset_views_multicrop(Preset::Byol, 32, 0.35, bad, &none, Normalize::cifar10())
            .unwrap_err()
            .to_string();
        assert!(e.contains("jitter scale must be in 0..=5"), "{e}");
    }
}
