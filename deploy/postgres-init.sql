-- The docker-compose PostgreSQL service: one database per hospital node, owned by the hrx
-- user the nodes connect as (POSTGRES_USER). Runs once, when the data volume is empty.
CREATE DATABASE hosp_a;
CREATE DATABASE hosp_b;
CREATE DATABASE hosp_c;
