import torch
import torch.nn.functional as F

from dpwa.augmult import augmult_views


def test_views_are_crops_of_the_reflect_padded_image_possibly_flipped():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (3, 2, 6, 6), dtype=torch.uint8)
    views = augmult_views(x, k=5, pad=2, flip=True, generator=g)
    assert views.shape == (3, 5, 2, 6, 6) and views.dtype == torch.uint8
    padded = F.pad(x.float(), (2, 2, 2, 2), mode="reflect")
    for b in range(3):
        for k in range(5):
            v = views[b, k].float()
            found = any(torch.equal(v, cand) or torch.equal(v, cand.flip(-1))
                        for dy in range(5) for dx in range(5) for cand in [padded[b, :, dy:dy + 6, dx:dx + 6]])
            assert found


def test_views_differ_and_identity_without_augmentation():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8)
    views = augmult_views(x, k=8, pad=4, flip=True, generator=g)
    assert len({views[0, k].numpy().tobytes() for k in range(8)}) > 1
    same = augmult_views(x, k=3, pad=0, flip=False, generator=g)
    assert torch.equal(same, x[:, None].expand(4, 3, 3, 8, 8))


def test_seeded_views_are_reproducible():
    x = torch.randint(0, 255, (2, 1, 8, 8), dtype=torch.uint8)
    a = augmult_views(x, k=4, pad=1, flip=True, generator=torch.Generator().manual_seed(3))
    b = augmult_views(x, k=4, pad=1, flip=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
