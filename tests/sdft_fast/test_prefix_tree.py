"""The packed prefix-tree layout of a token stream (the model tests check the attention over it)."""

from sdft_fast.prefix_tree import PrefixTreeStream


def test_stream_prefix_tree_layout():
    system, a, b = list(range(1, 11)), [20, 21, 22], [30, 31]
    seqs = [system + a + [40, 41], system + a + [40, 41], system + b, system + a + [50], [7, 8]]
    prompt_lens, completion_lens = [13, 13, 11, 13, 1], [2, 2, 1, 1, 2]
    tree = PrefixTreeStream(seqs, prompt_lens, completion_lens, "cpu", min_shared=2)
    # every distinct prefix appears once: system (10) + a (3) + [40, 41] (2) + b (2) + [50] + [7, 8]
    assert tree.input_ids.numel() == 10 + 3 + 2 + 2 + 1 + 2
    for seq, p, c, rows in zip(seqs, prompt_lens, completion_lens, tree.gather_rows.split(completion_lens)):
        # the rows gathered for a sequence hold its own tokens at its own positions
        assert tree.input_ids[rows].tolist() == seq[p - 1 : p - 1 + c]
        assert tree.position_ids[rows].tolist() == list(range(p - 1, p - 1 + c))
    for segment in tree.segments:  # a segment attends to its prefix, then to itself
        own = tuple(range(segment.start, segment.start + segment.length))
        assert segment.key_rows[-segment.length :] == own
        assert tree.position_ids[list(segment.key_rows)].tolist() == list(range(len(segment.key_rows)))
    # identical sequences share every row; sharing off lays every sequence out in full
    assert tree.gather_rows[0:2].tolist() == tree.gather_rows[2:4].tolist()
    plain = PrefixTreeStream(seqs, prompt_lens, completion_lens, "cpu", min_shared=0)
    assert plain.input_ids.tolist() == [t for s in seqs for t in s]
    assert all(s.key_rows == tuple(range(s.start, s.start + s.length)) for s in plain.segments)
    # a common prefix shorter than min_shared is not shared
    short = PrefixTreeStream([[1, 2, 3, 9], [1, 2, 3, 8]], [3, 3], [1, 1], "cpu", min_shared=4)
    assert short.input_ids.numel() == 8
