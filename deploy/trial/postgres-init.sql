-- TRIAL ONLY: the PostgreSQL service of deploy/trial/docker-compose.yml makes one database per
-- hospital node, owned by the hrx user the nodes connect as (POSTGRES_USER). Runs once, when
-- the data volume is empty.
CREATE DATABASE hosp_a;
CREATE DATABASE hosp_b;
CREATE DATABASE hosp_c;
