"""The optimizer ncf.py builds: Adam, fused where torch has it for the device, else foreach,
with the recipe's betas; both give the numbers of Adam written out by hand."""
import pytest
import torch

import ncf
from neumf import NeuMF

LR, BETAS, EPS = 0.01, (0.25, 0.5), 1e-8  # the recipe's betas


def reference_adam(params, grads_per_step, lr, betas, eps):
    """Kingma & Ba's Adam with bias correction, in float64: the parameters after each step."""
    beta1, beta2 = betas
    params = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    history = []
    for t, grads in enumerate(grads_per_step, 1):
        for p, g, m_, v_ in zip(params, grads, m, v, strict=True):
            g = g.double()
            m_.mul_(beta1).add_((1 - beta1) * g)
            v_.mul_(beta2).add_((1 - beta2) * g * g)
            m_hat = m_ / (1 - beta1**t)
            v_hat = v_ / (1 - beta2**t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
        history.append([p.clone() for p in params])
    return history


def run_steps(model, optimizer, grads_per_step):
    history = []
    for grads in grads_per_step:
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append([p.detach().clone() for p in model.parameters()])
    return history


def model_and_grads(steps=4):
    torch.manual_seed(0)
    model = NeuMF(20, 15, mf_dim=4, mlp_layer_sizes=(8, 6, 4), dropout=0.0)
    # Gradients of every scale, with zeros (rows an embedding batch did not touch) and sign changes.
    grads = []
    for step in range(steps):
        per_param = []
        for p in model.parameters():
            g = torch.randn_like(p) * 10.0 ** torch.randint(-4, 2, p.shape)
            g[torch.rand_like(p) < 0.2] = 0.0
            per_param.append(g * (-1) ** step)
        grads.append(per_param)
    return model, grads


def assert_matches_reference(model, optimizer, grads):
    expected = reference_adam(model.parameters(), grads, LR, BETAS, EPS)
    got = run_steps(model, optimizer, grads)
    for step, (want, have) in enumerate(zip(expected, got, strict=True), 1):
        for a, b in zip(want, have, strict=True):
            torch.testing.assert_close(b.double(), a, rtol=1e-5, atol=1e-7, msg=f"step {step}")


def test_make_optimizer_is_fused_adam_with_the_given_hyperparameters():
    model, grads = model_and_grads()
    optimizer, name = ncf.make_optimizer(model, LR, BETAS, EPS)
    assert name == "torch.optim.Adam(fused=True)"
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["fused"]
    (group,) = optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    assert_matches_reference(model, optimizer, grads)


@pytest.fixture
def no_fused_adam(monkeypatch):
    """torch.optim.Adam as on a device without the fused kernel: fused=True raises RuntimeError.
    Returns the real class."""
    real_adam = torch.optim.Adam

    def Adam(params, *args, fused=None, **kwargs):  # named as the class: ncf.py prints the name
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                               "devices")
        return real_adam(params, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", Adam)
    return real_adam


def test_without_a_fused_kernel_the_foreach_adam_gives_the_same_numbers(no_fused_adam):
    model, grads = model_and_grads()
    optimizer, name = ncf.make_optimizer(model, LR, BETAS, EPS)
    assert name == "torch.optim.Adam(foreach=True)"
    assert optimizer.defaults["foreach"] and not optimizer.defaults["fused"]
    assert_matches_reference(model, optimizer, grads)


def test_fused_and_foreach_agree_over_a_training_run(no_fused_adam):
    """Real gradients this time: ten steps of BCE on random pairs, fused against the fallback."""
    torch.manual_seed(0)
    config = {"nb_users": 20, "nb_items": 15, "mf_dim": 4, "mlp_layer_sizes": (8, 6, 4), "dropout": 0.0}
    fused_model, fallback_model = NeuMF(**config), NeuMF(**config)
    fallback_model.load_state_dict(fused_model.state_dict())
    fused_optimizer = no_fused_adam(fused_model.parameters(), lr=LR, betas=BETAS, eps=EPS, fused=True)
    fallback_optimizer, _ = ncf.make_optimizer(fallback_model, LR, BETAS, EPS)
    for _ in range(10):
        users, items = torch.randint(0, 20, (64,)), torch.randint(0, 15, (64,))
        labels = torch.randint(0, 2, (64,)).float()
        for model, optimizer in ((fused_model, fused_optimizer), (fallback_model, fallback_optimizer)):
            torch.nn.functional.binary_cross_entropy_with_logits(model(users, items), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(fused_model.parameters(), fallback_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
