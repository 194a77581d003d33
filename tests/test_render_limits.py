"""Each render bound and the message that names it: python-liquid's resource limits for
Liquid previews, the sandboxed and budgeted Jinja environment for message templates."""

from __future__ import annotations

import jinja2
import pytest
from conftest import FakeClock
from liquid.exceptions import ResourceLimitError

from proxy import config
from proxy.errors import RenderLimitExceeded
from proxy.liquid_preview import Fetched, render_liquid
from proxy.render_limits import BoundedEnvironment, LiquidLimits, TemplateLimits

LIMITS = LiquidLimits(max_iterations=1000, max_output=5000, timeout=1.0, context_depth=5)


def _nowhere(path: str, args: dict[str, str]) -> Fetched:
    raise AssertionError("no connected_content here")


def liquid_limit_message(source: str, limits: LiquidLimits = LIMITS) -> str:
    with pytest.raises(ResourceLimitError) as caught:
        render_liquid(source, {}, _nowhere, set(), environment=limits.environment_class())
    return limits.describe(caught.value)


def test_loop_iterations_multiply_across_nested_loops():
    message = liquid_limit_message("{% for a in (1..100) %}{% for b in (1..100) %}x{% endfor %}{% endfor %}")
    assert message.startswith("loop_iteration_limit")
    assert "1000" in message and "CCPROXY_PREVIEW_MAX_ITERATIONS" in message


def test_output_limit_names_its_bytes():
    message = liquid_limit_message("{% for a in (1..500) %}0123456789A{% endfor %}")
    assert message.startswith("output_stream_limit") and "5000 bytes" in message
    assert "CCPROXY_PREVIEW_MAX_OUTPUT" in message


def test_assigned_values_are_bounded_too():
    message = liquid_limit_message("{% assign s = 'abcdefghij' %}" + "{% assign s = s | append: s %}" * 12)
    assert message.startswith("local_namespace_limit") and "5000 bytes" in message


def test_context_depth():
    nested = "{% for a in (1..1) %}" * 6 + "x" + "{% endfor %}" * 6
    assert liquid_limit_message(nested).startswith("context_depth_limit: templates nest more than 5")


def test_block_nesting_is_a_limit_too():
    nested = "{% if true %}" * 40 + "x" + "{% endif %}" * 40
    assert liquid_limit_message(nested).startswith("block_nesting_limit: blocks nest more than 30")


def test_timeout_and_memory_messages_name_their_values():
    assert LIMITS.timeout_message() == (
        "timeout: the render took longer than 1 s (CCPROXY_PREVIEW_TIMEOUT) and was stopped")
    assert LiquidLimits.memory_message().startswith("memory: the render needed more than 512 MB")


def test_real_messages_fit_the_default_limits():
    limits = LiquidLimits.from_settings(config.load(environ={}))
    source = ("{% for item in (1..50) %}<tr>{% for col in (1..20) %}<td>{{ item | times: col }}</td>"
              "{% endfor %}</tr>{% endfor %}")
    answer = render_liquid(source, {}, _nowhere, set(), environment=limits.environment_class())
    assert answer["output"].count("<td>") == 1000


def jinja(**templates: str) -> BoundedEnvironment:
    return BoundedEnvironment(loader=jinja2.DictLoader(templates))


TEMPLATE_LIMITS = TemplateLimits(max_iterations=100, max_output=1000, timeout=0.5)


def template_limit_message(source: str, clock=None) -> str:
    env = jinja(**{"t.html": source})
    with pytest.raises(RenderLimitExceeded) as caught:
        if clock is None:
            env.render_bounded("t.html", {}, TEMPLATE_LIMITS)
        else:
            env.render_bounded("t.html", {}, TEMPLATE_LIMITS, clock)
    assert caught.value.code == "template_limit" and caught.value.status == 422
    return caught.value.message


def test_template_iterations_count_every_loop_in_all():
    message = template_limit_message("{% for a in range(60) %}{% endfor %}{% for b in range(60) %}{% endfor %}")
    assert message == "t.html: the template loops more than 100 times (CCPROXY_RENDER_MAX_ITERATIONS)"


def test_recursive_loops_are_counted():
    env = jinja(**{"t.html": "{% for n in tree recursive %}{{ loop(n.children) }}{% endfor %}"})
    tree: list = []
    for _ in range(8):
        tree = [{"children": tree}, {"children": tree}]
    with pytest.raises(RenderLimitExceeded, match="loops more than 100 times"):
        env.render_bounded("t.html", {"tree": tree}, TEMPLATE_LIMITS)


def test_template_output_limit():
    message = template_limit_message("{% for a in range(50) %}{{ '0123456789' * 3 }}{% endfor %}")
    assert message == ("t.html: the output would be longer than 1000 characters "
                       "(CCPROXY_RENDER_MAX_OUTPUT)")


def test_repetition_and_power_are_checked_before_they_run():
    assert "repetition would be longer than 1000 characters" in template_limit_message("{{ 'x' * 10**8 }}")
    assert "exponent larger than 1000" in template_limit_message("{{ 7 ** 100000000 }}")


@pytest.mark.parametrize("source, what", [
    ("{{ 'x' | center(200000000) }}", "the filter center"),
    ("{{ '%0200000000d' | format(1) }}", "the filter format"),
    ("{{ '%0200000000d' % 1 }}", "a format"),
    ("{{ '%(a)200000000s' % {'a': 'x'} }}", "a format"),
    ("{{ '%*s' | format(200000000, 'x') }}", "the filter format"),
    ("{{ 'x'.center(200000000) }}", "a string method"),
    ("{{ '{:>200000000}'.format('x') }}", "a string method"),
    ("{{ '{:>{}}'.format('x', 200000000) }}", "a string method"),
    ("{{ range(1000) | join('y' * 900) }}", "the filter join"),
    ("{{ range(1000) | map('string') | join('y' * 900) }}", "the filter join"),
    ("{{ ('x' * 900) | replace('x', 'y' * 900) }}", "the filter replace"),
    ("{{ ('a\n' * 400) | indent(900) }}", "the filter indent"),
    ("{{ ('a ' * 400) | wordwrap(1, wrapstring='y' * 900) }}", "the filter wordwrap"),
    # A macro that calls itself twice doubles its text per level.
    ("{% macro d(n) %}{% if n %}{{ d(n - 1) }}{{ d(n - 1) }}{% else %}xxxxxxxx{% endif %}{% endmacro %}{{ d(40) }}",
     "a value"),
])
def test_what_builds_a_huge_string_from_a_short_expression_is_refused_before_it_runs(source, what):
    """Checked before the string exists (constants too: jinja would otherwise work them out
    while compiling, outside any budget)."""
    assert template_limit_message(source) == (
        f"t.html: {what} would {'write more' if what.startswith(('the filter', 'a string')) else 'be longer'} than 1000 "
        "characters (CCPROXY_RENDER_MAX_OUTPUT)")


def test_the_checked_filters_write_what_jinja_writes():
    env = jinja(**{"t.html": "{{ '%3d' % 7 }}|{{ 'ab' | center(6) }}|{{ [1, 2] | join(', ') }}|"
                             "{{ 'abc' | replace('b', 'xy') }}|{{ 'a\nb' | indent(2) }}|{{ 'a b' | wordwrap(1) }}|"
                             "{{ '%s-%s' | format(1, 2) }}|{{ '%(n)3s' % {'n': 'a'} }}|{{ 'a'.rjust(3) }}|"
                             "{{ '{:>3}'.format('b') }}"})
    assert env.render_bounded("t.html", {}, TEMPLATE_LIMITS) == "  7|  ab  |1, 2|axyc|a\n  b|a\nb|1-2|  a|  a|  b"


def test_a_macro_that_recurses_without_output_is_stopped_by_the_clock():
    clock = FakeClock()

    def ticking() -> float:
        clock.advance(0.01)
        return clock()

    env = jinja(**{"t.html": "{% macro row(n) %}{% if n > 0 %}{{ row(n - 1) }}{{ row(n - 1) }}{% endif %}"
                             "{% endmacro %}{{ row(40) }}"})
    started = clock()
    with pytest.raises(RenderLimitExceeded, match="took longer than 0.5 s"):
        env.render_bounded("t.html", {}, TEMPLATE_LIMITS, ticking)
    assert clock() - started < 1  # stopped at the first check past the budget, not after 2**40 calls


def test_template_time_budget_stops_a_loop():
    clock = FakeClock()

    def ticking() -> float:
        clock.advance(0.01)  # each check sees 10 ms pass
        return clock()

    env = jinja(**{"t.html": "{% for a in range(90) %}{% endfor %}"})
    with pytest.raises(RenderLimitExceeded) as caught:
        env.render_bounded("t.html", {}, TEMPLATE_LIMITS, ticking)
    assert caught.value.message == (
        "t.html: the render took longer than 0.5 s (CCPROXY_RENDER_TIMEOUT) and was stopped")


def test_sandbox_refuses_python_internals():
    env = jinja(**{"t.html": "{{ ''.__class__.__mro__ }}"})
    with pytest.raises(jinja2.exceptions.SecurityError):
        env.render_bounded("t.html", {}, TEMPLATE_LIMITS)


def test_a_normal_template_renders():
    env = jinja(**{"t.html": "{% for x in items %}{{ x }}{% if not loop.last %}, {% endif %}{% endfor %}"})
    assert env.render_bounded("t.html", {"items": [1, 2, 3]}, TEMPLATE_LIMITS) == "1, 2, 3"


@pytest.mark.parametrize("name", ["preview_max_iterations", "preview_max_output", "preview_timeout",
                                  "preview_concurrency", "render_max_iterations",
                                  "render_max_output", "render_timeout"])
def test_bounds_must_be_positive(name):
    with pytest.raises(config.SettingsError, match=config.env_name(name)):
        config.load(environ={config.env_name(name): "0"})


@pytest.mark.parametrize("source", ["{{ items.append(4) }}", "{{ items.pop() }}", "{{ d.update(a=2) }}",
                                    "{{ d.setdefault('b', 1) }}", "{{ d.clear() }}"])
def test_sandbox_refuses_changing_what_it_is_given(source):
    items, d = [1, 2, 3], {"a": 1}
    env = jinja(**{"t.html": source})
    with pytest.raises(jinja2.exceptions.SecurityError):
        env.render_bounded("t.html", {"items": items, "d": d}, TEMPLATE_LIMITS)
    assert (items, d) == ([1, 2, 3], {"a": 1})
