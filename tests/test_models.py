import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_pipeline.schema import SPARSE_COLUMNS
from models import build_model


def kjt(batch: int, size: int = 10) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(SPARSE_COLUMNS),
        values=torch.randint(0, size, (26 * batch,)),
        lengths=torch.ones(26 * batch, dtype=torch.long),
    )


@pytest.mark.parametrize("arch", ["dlrm", "dcn", "mlp"])
def test_models_return_one_logit_per_example_and_train(arch):
    torch.manual_seed(0)
    model = build_model(
        arch,
        table_sizes=[10] * 26,
        embedding_dim=4,
        dense_arch=[8, 4],
        over_arch=[8, 1],
        dcn_num_layers=2,
        dcn_low_rank=4,
        mlp_layers=[16, 8],
        device="cpu",
    )
    x, s = torch.rand(32, 13), kjt(32)
    y = (x[:, 0] > 0.5).float()
    out = model(x, s)
    assert out.shape == (32,)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x, s), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    # tables are where TorchRec's sharders look for them
    assert hasattr(model.sparse_arch, "embedding_bag_collection")


def test_meta_build_allocates_nothing():
    model = build_model("dlrm", table_sizes=[10**7] * 26, embedding_dim=16, device="meta")
    assert all(p.is_meta for p in model.parameters())


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown model arch"):
        build_model("transformer", table_sizes=[10] * 26, embedding_dim=4, device="cpu")


@pytest.mark.parametrize("arch", ["dlrm", "dcn", "mlp"])
def test_dense_bucket_tables(arch):
    from data_pipeline.batching import BUCKET_KEYS

    model = build_model(
        arch, table_sizes=[10] * 26, embedding_dim=4, dense_arch=[8, 4], over_arch=[8, 1],
        dcn_num_layers=2, dcn_low_rank=4, mlp_layers=[16, 8], dense_buckets=20, device="cpu",
    )  # fmt: skip
    configs = model.sparse_arch.embedding_bag_collection.embedding_bag_configs()
    assert [c.feature_names[0] for c in configs] == list(SPARSE_COLUMNS) + BUCKET_KEYS
    assert [c.num_embeddings for c in configs[26:]] == [20] * 13
    s = KeyedJaggedTensor.from_lengths_sync(
        keys=list(SPARSE_COLUMNS) + BUCKET_KEYS,
        values=torch.randint(0, 10, (39 * 5,)),
        lengths=torch.ones(39 * 5, dtype=torch.long),
    )
    assert model(torch.rand(5, 13), s).shape == (5,)


def test_smelu_matches_its_closed_form_and_gradient():
    from models import smelu

    beta = 0.7
    x = torch.tensor([-3.0, -0.7, -0.2, 0.0, 0.35, 0.7, 2.5], dtype=torch.float64, requires_grad=True)
    y = smelu(x, beta)
    expected = [0.0, 0.0, (0.5**2) / 2.8, 0.7**2 / 2.8, (1.05**2) / 2.8, 0.7, 2.5]
    torch.testing.assert_close(y, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    y.sum().backward()
    # gradient: 0 below -beta, (x + beta) / (2 beta) inside, 1 above; continuous at both ends
    grad = [0.0, 0.0, 0.5 / 1.4, 0.5, 1.05 / 1.4, 1.0, 1.0]
    torch.testing.assert_close(x.grad, torch.tensor(grad, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="beta"):
        smelu(x, 0.0)


@pytest.mark.parametrize("arch", ["dlrm", "dcn", "mlp"])
def test_smelu_replaces_every_hidden_activation_and_keeps_the_state_dict(arch):
    from torchrec.modules.mlp import Perceptron

    from models import SmeLU, build_model

    kw = dict(table_sizes=[10] * 26, embedding_dim=4, dense_arch=[8, 4], over_arch=[8, 1], mlp_layers=[8, 4])
    relu = build_model(arch, **kw, device="cpu")
    smooth = build_model(arch, **kw, activation="smelu", smelu_beta=0.5, device="cpu")
    assert set(relu.state_dict()) == set(smooth.state_dict())

    def hidden(model):  # every hidden-layer activation: TorchRec's Perceptron's, and activation modules
        acts = [m._activation_fn for m in model.modules() if isinstance(m, Perceptron)]
        return acts + [m for m in model.modules() if isinstance(m, (torch.nn.ReLU, SmeLU)) and m not in acts]

    assert len(hidden(smooth)) == len(hidden(relu)) > 0
    assert all(isinstance(a, SmeLU) and a.beta == 0.5 for a in hidden(smooth))
    with pytest.raises(ValueError, match="activation"):
        build_model(arch, **kw, activation="gelu", device="cpu")
