-- The services' role of least privilege (flashclaim/core/privileges.py): it logs in and
-- owns nothing. `flashclaim schema apply --grant-to flashclaim_app`, run as the owner,
-- gives it the rows of flashclaim's tables. Compose runs this once, when the database
-- is first made (/docker-entrypoint-initdb.d); safe to run again.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'flashclaim_app') THEN
        CREATE ROLE flashclaim_app LOGIN PASSWORD 'flashclaim_app';
    END IF;
END
$$;
