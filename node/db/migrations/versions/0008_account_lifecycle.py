"""Accounts have a lifecycle: users can be removed (the row stays, so the name is never reused)
and carry a token generation that revocation moves on (portal sessions record it too); tokens
issued are listed by id (``node_tokens``); sign-in throttles per account and address
(``signin_throttle``) replace the account lock (``failed_logins``, ``locked_until``). An
account locked when the upgrade runs stays throttled until its lock would have ended.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26 09:00:00
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

FORGET_SECONDS = 24 * 3600  # node.identity.users.FORGET_SECONDS when this was written


def upgrade() -> None:
    op.create_table(
        "node_tokens",
        sa.Column("jti", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("issued", sa.BigInteger(), nullable=False),
        sa.Column("expires", sa.BigInteger(), nullable=False),
        sa.Column("revoked", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("jti"),
    )
    with op.batch_alter_table("node_tokens", schema=None) as batch_op:
        batch_op.create_index("ix_node_tokens_username", ["username"], unique=False)
        batch_op.create_index("ix_node_tokens_expires", ["expires"], unique=False)
    throttle = op.create_table(
        "signin_throttle",
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("blocked_until", sa.BigInteger(), nullable=False),
        sa.Column("last_attempt", sa.BigInteger(), nullable=False),
        sa.Column("last_success", sa.BigInteger(), nullable=True),
        sa.Column("expires", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("username", "address"),
    )
    with op.batch_alter_table("signin_throttle", schema=None) as batch_op:
        batch_op.create_index("ix_signin_throttle_expires", ["expires"], unique=False)

    now = int(time.time())
    old_users = sa.table(
        "node_users", sa.column("username", sa.String), sa.column("locked_until", sa.BigInteger)
    )
    bind = op.get_bind()
    locked = bind.execute(
        sa.select(old_users.c.username, old_users.c.locked_until).where(
            old_users.c.locked_until > now
        )
    ).all()
    if locked:
        assert throttle is not None
        bind.execute(
            throttle.insert(),
            [
                {
                    "username": username,
                    "address": "",  # the account from every address it is not known from
                    "failures": 5,
                    "blocked_until": until,
                    "last_attempt": now,
                    "last_success": None,
                    "expires": max(until, now + FORGET_SECONDS),
                }
                for username, until in locked
            ],
        )

    with op.batch_alter_table("node_users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("removed", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("token_generation", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.drop_column("failed_logins")
        batch_op.drop_column("locked_until")
    with op.batch_alter_table("portal_sessions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("generation", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("portal_sessions", schema=None) as batch_op:
        batch_op.drop_column("generation")
    with op.batch_alter_table("node_users", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("locked_until", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("failed_logins", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.drop_column("token_generation")
        batch_op.drop_column("removed")
    with op.batch_alter_table("signin_throttle", schema=None) as batch_op:
        batch_op.drop_index("ix_signin_throttle_expires")
    op.drop_table("signin_throttle")
    with op.batch_alter_table("node_tokens", schema=None) as batch_op:
        batch_op.drop_index("ix_node_tokens_expires")
        batch_op.drop_index("ix_node_tokens_username")
    op.drop_table("node_tokens")
