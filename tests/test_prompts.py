from r2ec.prompts import PromptBuilder, closing_marker, format_timedelta, render_item, render_user

DAY, HOUR, MIN = 86400, 3600, 60


def test_timedelta_format_matches_the_official_code():
    assert format_timedelta(3 * DAY + 4 * HOUR + 30 * MIN) == "3d 4.5h ago"
    assert format_timedelta(2 * HOUR + 15 * MIN) == "2h 15.0min ago"
    assert format_timedelta(35 * MIN + 30) == "35.5min ago"
    assert format_timedelta(0) == "0.0min ago"
    # sub-second parts are ignored, as in the official code
    assert format_timedelta(59.9) == "1.0min ago"  # 59 s -> 0.983 min


def test_user_text_exact():
    b = PromptBuilder("video games", "video game", history_items=2)
    text = b.user_text(["Old", "A", "B"], [5.0, 4.0, None], [0, DAY, 2 * DAY], target_timestamp=2 * DAY + HOUR)
    assert text == (
        "Analyze in depth and finally recommend next video game I might purchase inside <answer> and </answer>.\n"
        "For example, <answer>a product</answer>.\n\n"
        "Below is my historical video games purchases and ratings (out of 5):\n"
        "1d 1.0h ago: [A] (4.0)\n"
        "1h 0.0min ago: [B]"
    )


def test_rating_scale_in_the_user_prompt():
    from r2ec.config import PromptConfig

    def head(cfg: PromptConfig) -> str:
        return PromptBuilder.from_config(cfg, "<answer>").user_text(["A"], [4.0], [0], 60).split("\n")[3]

    default = PromptConfig(category="movies", item_singular="movie")
    assert head(default) == "Below is my historical movies purchases and ratings (out of 5):"
    assert PromptBuilder("movies", "movie").user_head() == PromptBuilder.from_config(default, "<answer>").user_head()
    # from YAML the scale arrives as a list of numbers; the max is printed with :g (10, not 10.0)
    wide = PromptConfig.model_validate({"category": "movies", "item_singular": "movie", "rating_scale": [0.5, 10]})
    assert head(wide) == "Below is my historical movies purchases and ratings (out of 10):"
    half = PromptConfig(category="movies", item_singular="movie", rating_scale=(0.5, 4.5))
    assert head(half).endswith("(out of 4.5):")


def test_item_text_leaves_out_missing_fields_and_truncates_description():
    b = PromptBuilder("video games", "video game", description_words=3)
    full = b.item_text({"title": "T", "average_rating": 4.5, "rating_number": 12, "categories": [],
                        "description": "one two three four five"})
    assert full == (
        "Summarize key attributes of the following video game inside <answer> and </answer>.\n\n"
        "Title: T\nUser Rating: 4.5\nNumber of Buyers: 12\nDescription: one two three..."
    )
    bare = b.item_text({"title": "T", "average_rating": None, "rating_number": None, "description": None,
                        "categories": ["Comedy", "Drama"]})
    assert bare.endswith("\n\nTitle: T\nCategories: Comedy, Drama")


def test_closing_marker():
    assert closing_marker("<answer>") == "</answer>"


def test_chat_rendering_opens_the_turns(tiny_model):
    tok = tiny_model.tokenizer
    b = PromptBuilder("movies", "movie")
    user = tok.decode(render_user(tok, b.user_messages(["A"], [3.0], [0], 60)))
    assert user.startswith("<|im_start|>user\n") and user.endswith("<|im_start|>assistant\n")
    item = tok.decode(render_item(tok, b.item_messages({"title": "A"})))
    # the assistant turn is pre-filled with the marker and left open: no end-of-turn after it
    assert item.endswith("<|im_start|>assistant\n<answer>")
