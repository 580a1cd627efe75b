-- Row-level security for postgres_changes: which of a batch of row versions each subscriber's
-- role, with its JWT claims, may SELECT. The versions are the ones in the change, not the table's
-- current rows: they are rebuilt from their column text (once per call, as values of the table's
-- row type), and the table's SELECT policies that apply to the role (permissive ones OR'd,
-- restrictive ones AND'd, as Postgres combines them) are evaluated on them as that role with the
-- claims set, so functions such as auth.uid() and subqueries into other tables behave as in a
-- query by that role.
--
-- Arguments, one element per claims set: `roles`, `claims`, and `wanted` (an int[] literal of the
-- 1-based positions in `rows` to check for it, or NULL for all of them). `rows` is a JSON array of objects mapping column
-- names to their text (or null); a column that is absent is NULL. `template` is a NULL array of
-- the table's row type (it types the rebuilt rows). An error for one claims set (a policy that
-- raises, an unknown role) is reported in its row and does not affect the others.
--
-- One result row per claims set k (1-based, in input order):
--   access  'none'  the role may SELECT no column of the table
--           'open'  row-level security does not apply to the role (disabled, BYPASSRLS, owner)
--           'rls'   `visible` lists the wanted positions whose row version it may see
--           'error' `error` says why: deny
--   hidden  columns the role may not SELECT (column grants)
-- Nothing here writes. Callers sort claims sets by role: policies are looked up once per role.

CREATE OR REPLACE FUNCTION walcast.rls_check(
    rel regclass, roles text[], claims jsonb[], wanted text[], rows jsonb, template anyarray
)
    RETURNS TABLE (k int, access text, hidden text[], visible int[], error text)
    LANGUAGE plpgsql
    SET search_path = ''
    AS $fn$
DECLARE
    typed template%TYPE;
    alias text;
    columns text;
    casts text;
    role_name text;
    checked_role text;
    role_access text;
    role_hidden text[];
    query text;
    query_all text;
    checker text;
    caller_role text := pg_catalog.current_setting('role');
BEGIN
    SELECT pg_catalog.quote_ident(c.relname) INTO alias FROM pg_catalog.pg_class c WHERE c.oid = rel;
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum),
           pg_catalog.string_agg(pg_catalog.format('(r.j ->> %L)::%s', a.attname,
                                 pg_catalog.format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY a.attnum)
      INTO columns, casts
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped;
    FOR i IN 1 .. coalesce(pg_catalog.array_length(roles, 1), 0) LOOP
        k := i;
        error := NULL;
        role_name := roles[i];
        BEGIN
            IF checked_role IS DISTINCT FROM role_name THEN
                checked_role := NULL;
                PERFORM pg_catalog.set_config('role', role_name, true);
                IF NOT pg_catalog.has_any_column_privilege(rel, 'SELECT') THEN
                    role_access := 'none';
                    role_hidden := NULL;
                ELSE
                    SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attnum)
                      INTO role_hidden
                      FROM pg_catalog.pg_attribute a
                     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
                       AND NOT pg_catalog.has_column_privilege(rel, a.attnum, 'SELECT');
                    role_access := CASE WHEN pg_catalog.row_security_active(rel) THEN 'rls' ELSE 'open' END;
                END IF;
                query := NULL;
                IF role_access = 'rls' THEN
                    SELECT pg_catalog.format(
                               'SELECT coalesce(pg_catalog.array_agg(walcast_n::int ORDER BY walcast_n), ''{}'') '
                               'FROM pg_catalog.unnest($1) WITH ORDINALITY AS %s(%s, walcast_n) '
                               'WHERE /*wanted*/ (%s)%s',
                               alias, columns,
                               pg_catalog.string_agg('(' || pg_catalog.pg_get_expr(p.polqual, p.polrelid) || ')', ' OR ')
                                   FILTER (WHERE p.polpermissive),
                               coalesce(' AND ' || pg_catalog.string_agg('(' || pg_catalog.pg_get_expr(p.polqual, p.polrelid) || ')', ' AND ')
                                   FILTER (WHERE NOT p.polpermissive), ''))
                      INTO query
                      FROM pg_catalog.pg_policy p
                     WHERE p.polrelid = rel AND p.polcmd IN ('r', '*') AND p.polqual IS NOT NULL
                       AND EXISTS (SELECT FROM pg_catalog.unnest(p.polroles) AS pr(id)
                                    WHERE pr.id = 0 OR pg_catalog.pg_has_role(role_name, pr.id, 'USAGE'))
                    HAVING pg_catalog.bool_or(p.polpermissive);
                    -- Positions are matched by hashing: a batch may hold thousands of rows.
                    -- (Deparsed policies contain no comments.)
                    query_all := pg_catalog.replace(query, '/*wanted*/', '');
                    query := pg_catalog.replace(query, '/*wanted*/', 'walcast_n IN (SELECT pg_catalog.unnest($2)) AND');
                    -- The check as a function of this session, named by its text: PL/pgSQL keeps
                    -- its plan, so each claims set costs an execution, not a planning.
                    checker := NULL;
                    IF query IS NOT NULL THEN
                        checker := 'walcast_rls_' || pg_catalog.md5(query || rel::text);
                        IF NOT EXISTS (SELECT FROM pg_catalog.pg_proc f
                                        WHERE f.proname = checker AND f.pronamespace = pg_catalog.pg_my_temp_schema()) THEN
                            PERFORM pg_catalog.set_config('role', caller_role, true);
                            EXECUTE pg_catalog.format(
                                'CREATE FUNCTION pg_temp.%I(%s[], int[]) RETURNS int[] LANGUAGE plpgsql AS '
                                '$walcast_check$ #variable_conflict use_column
'
                                'BEGIN IF $2 IS NULL THEN RETURN (%s); ELSE RETURN (%s); END IF; END $walcast_check$',
                                checker, rel, query_all, query);
                            PERFORM pg_catalog.set_config('role', role_name, true);
                        END IF;
                    END IF;
                    IF query IS NOT NULL AND typed IS NULL THEN
                        -- The rows, typed once for every claims set.
                        EXECUTE pg_catalog.format(
                            'SELECT pg_catalog.array_agg(ROW(%s)::%s ORDER BY r.n) '
                            'FROM pg_catalog.jsonb_array_elements($1) WITH ORDINALITY AS r(j, n)',
                            casts, rel)
                          INTO typed USING rows;
                    END IF;
                END IF;
                checked_role := role_name;
            END IF;
            access := role_access;
            hidden := role_hidden;
            visible := NULL;
            IF role_access = 'rls' THEN
                visible := '{}';
                IF query IS NOT NULL AND wanted[i] IS DISTINCT FROM '{}' THEN
                    PERFORM pg_catalog.set_config('role', role_name, true);
                    PERFORM pg_catalog.set_config('request.jwt.claims', claims[i]::text, true);
                    PERFORM pg_catalog.set_config('request.jwt.claim.sub', coalesce(claims[i] ->> 'sub', ''), true);
                    PERFORM pg_catalog.set_config('request.jwt.claim.role', coalesce(claims[i] ->> 'role', ''), true);
                    EXECUTE pg_catalog.format('SELECT pg_temp.%I($1, $2)', checker)
                      INTO visible USING typed, wanted[i]::int[];
                END IF;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            access := 'error';
            hidden := NULL;
            visible := NULL;
            error := SQLERRM;
            checked_role := NULL;
        END;
        RETURN NEXT;
    END LOOP;
    PERFORM pg_catalog.set_config('role', caller_role, true);
    PERFORM pg_catalog.set_config('request.jwt.claims', '', true);
    PERFORM pg_catalog.set_config('request.jwt.claim.sub', '', true);
    PERFORM pg_catalog.set_config('request.jwt.claim.role', '', true);
END
$fn$;
