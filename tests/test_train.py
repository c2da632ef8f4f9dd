import pytest
import torch

from compressor import zoo
from compressor.errors import InputError
from compressor.train import cosine_lambda, evaluate, kd_loss, load_checkpoint, train_dense


def _model():
    torch.manual_seed(0)
    return zoo.build("lenet300", in_channels=1, num_classes=10, input_size=8)


def test_kd_loss_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(8, 10)
    assert kd_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, torch.randn(8, 10), 4.0).item() > 0


def test_cosine_schedule_values():
    factor = cosine_lambda(100, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5)
    assert factor(100) == pytest.approx(0.0)


def test_training_learns_digits(digits):
    model = _model()
    before = evaluate(model, digits.test)
    train_dense(model, digits.train, epochs=3)
    assert evaluate(model, digits.test) > max(0.8, before + 0.3)


def test_checkpoint_resume_is_bit_identical(tmp_path, monkeypatch):
    import compressor.train as train_mod
    from compressor.data import load_data

    straight = _model()
    train_dense(straight, load_data("digits", seed=1, limit=256).train, epochs=3)

    ckpt = tmp_path / "run.ckpt"
    real_save = train_mod.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_dense(
            _model(), load_data("digits", seed=1, limit=256).train, epochs=3, checkpoint=ckpt
        )
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)

    torch.manual_seed(123)  # the checkpoint's RNG state must override whatever is current
    resumed = _model()
    train_dense(resumed, load_data("digits", seed=1, limit=256).train, epochs=3, checkpoint=ckpt)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_checkpoint_refuses_mismatch_and_garbage(tmp_path):
    from compressor.data import load_data

    ckpt = tmp_path / "run.ckpt"
    train_dense(_model(), load_data("digits", limit=64).train, epochs=1, checkpoint=ckpt)
    other = zoo.build("lenet5", in_channels=1, num_classes=10, input_size=8)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(InputError, match="does not match"):
        load_checkpoint(ckpt, model=other, optimizer=optimizer)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="damaged"):
        load_checkpoint(garbage, model=other, optimizer=optimizer)
