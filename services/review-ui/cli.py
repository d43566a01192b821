"""``emc users ...``: reviewer accounts of the review UI."""

from __future__ import annotations

import sys

import typer


def register(app: typer.Typer) -> None:
    """Add the ``emc users`` command group (``add``, ``list``, ``remove``) to the app."""
    users = typer.Typer(help="Reviewer accounts of the review UI.", no_args_is_help=True)
    app.add_typer(users, name="users")

    @users.command("add")
    def add(
        name: str = typer.Argument(..., help="user name (lowercase letters, digits, . _ -)"),
        password_stdin: bool = typer.Option(
            False, "--password-stdin", help="read the password from the first line of stdin"
        ),
        update: bool = typer.Option(
            False, "--update", help="set a new password for an existing user"
        ),
    ) -> None:
        """Create a reviewer account (prompts for the password)."""
        from common.store import open_store
        from services.review_ui.users import UserError, add_user

        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
        try:
            add_user(open_store(), name, password, replace=update)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"user {name} {'updated' if update else 'created'}")

    @users.command("list")
    def list_() -> None:
        """List reviewer accounts."""
        from rich.console import Console
        from rich.table import Table

        from common.store import open_store
        from services.review_ui.users import list_users

        table = Table("user", "created", "password changed")
        for u in list_users(open_store()):
            table.add_row(
                u.name, f"{u.created_at:%Y-%m-%d %H:%M}", f"{u.updated_at:%Y-%m-%d %H:%M}"
            )
        Console().print(table)

    @users.command("remove")
    def remove(name: str) -> None:
        """Delete a reviewer account (their labels stay)."""
        from common.store import open_store
        from services.review_ui.users import remove_user

        if not remove_user(open_store(), name):
            typer.echo(f"error: no user {name!r}", err=True)
            raise typer.Exit(2)
        typer.echo(f"user {name} removed")
