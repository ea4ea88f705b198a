"""The item table's owner (r2ec/item_table.py): row updates, pending rows, full refreshes."""

import pytest
import torch

from r2ec.item_table import ItemTable


def test_write_back_updates_now_and_keeps_the_rows_pending():
    table = ItemTable(torch.zeros(4, 2))
    assert table.pending[0].numel() == 0 and table.pending[1].shape == (0, 2)
    idx, rows = torch.tensor([1, 3]), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    table.write_back(idx, rows)
    assert torch.equal(table.rows, torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 4.0]]))
    assert torch.equal(table.pending[0], idx) and torch.equal(table.pending[1], rows)


def test_a_learner_copy_applies_the_pending_rows_and_then_agrees():
    driver, learner = ItemTable(torch.zeros(3, 2)), ItemTable(torch.zeros(3, 2))
    driver.write_back(torch.tensor([2]), torch.tensor([[5.0, 6.0]]))
    assert not torch.equal(driver.rows, learner.rows)  # one step late ...
    learner.apply(*driver.pending)
    assert torch.equal(driver.rows, learner.rows)  # ... and equal once applied


def test_refresh_replaces_every_row_and_clears_what_is_pending():
    table = ItemTable(torch.zeros(3, 2))
    table.write_back(torch.tensor([0]), torch.ones(1, 2))
    table.refresh(torch.full((3, 2), 7.0), step=5)
    assert table.version == 5 and bool((table.rows == 7).all()) and table.pending[0].numel() == 0
    with pytest.raises(ValueError, match=r"keep the table's shape \(3, 2\)"):
        table.refresh(torch.zeros(4, 2), step=6)


def test_an_empty_update_is_a_no_op_and_a_table_is_two_dimensional():
    table = ItemTable(torch.ones(2, 2))
    table.apply(torch.zeros(0, dtype=torch.long), torch.zeros(0, 2))
    assert bool((table.rows == 1).all())
    with pytest.raises(ValueError, match=r"\(V, d\)"):
        ItemTable(torch.ones(3))
