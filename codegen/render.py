"""Stage 3: render a template with a context (Jinja2, strict about missing values)."""

import os

import jinja2

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "templates")


def environment(template_dir=TEMPLATE_DIR):
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template, context, env=None):
    env = env or environment()
    return env.get_template(template).render(**context)
